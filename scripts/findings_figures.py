"""The Findings' two extra figures, read back from the study's TensorBoard event files:

  findings_grad_map.png  the last ``grad_map/features`` of an FC run and of a capsule run (128 px,
                         adapter=none, AdamW, seed 0): where on the 4x4 map the head's gradient enters
  findings_drift.png     ``drift/<stage>`` at the last validation, stem to head, for FC vs capsule
                         at 128 px and capsule none vs conv at 224 px (seed 0, AdamW)

  python scripts/findings_figures.py <study folder> <figure folder>   (scripts/findings.sh runs it)
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from capsexp.models.stages import STAGES  # noqa: E402  (stem to head, as capsexp report orders them)
GRAD_MAP_RUNS = {"FC head": "grid128_fc/*_adapter=none,optim=adamw,seed=0",
                 "capsule head (3 iterations)": "grid128_capsule/*_adapter=none,head.routing.iterations=3,optim=adamw,seed=0"}
DRIFT_RUNS = {"fc, none, 128 px": "grid128_fc/*_adapter=none,optim=adamw,seed=0",
              "capsule r3, none, 128 px": "grid128_capsule/*_adapter=none,head.routing.iterations=3,optim=adamw,seed=0",
              "capsule r3, conv, 128 px": "grid128_capsule/*_adapter=conv,head.routing.iterations=3,optim=adamw,seed=0",
              "capsule r3, none, 224 px": "seed224/*_adapter=none,seed=0",
              "capsule r3, conv, 224 px": "seed224/*_adapter=conv,seed=0"}


def _events(study: Path, pattern: str) -> EventAccumulator:
    found = sorted(study.glob(pattern))
    if not found:
        sys.exit(f"findings_figures: no run matches '{study / pattern}'; run scripts/findings.sh first.")
    acc = EventAccumulator(str(found[0]), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def grad_map_pair(study: Path, out: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.4))
    for ax, (title, pattern) in zip(axes, GRAD_MAP_RUNS.items()):
        last = _events(study, pattern).Images("grad_map/features")[-1]
        ax.imshow(Image.open(io.BytesIO(last.encoded_image_string)))
        ax.set_title(f"{title}, step {last.step}")
        ax.axis("off")
    fig.suptitle("grad_map/features: ||dL/dF|| per position of the 4x4 map (128 px)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def drift_chart(study: Path, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.4))
    for label, pattern in DRIFT_RUNS.items():
        acc = _events(study, pattern)
        tags = set(acc.Tags()["scalars"])
        points = [(i, acc.Scalars(f"drift/{s}")[-1].value) for i, s in enumerate(STAGES) if f"drift/{s}" in tags]
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", label=label)
    ax.set_xticks(range(len(STAGES)), STAGES)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("linear CKA to the start (1 = unchanged)")
    ax.set_title("drift/<stage> at the last validation (step 60, AdamW, seed 0)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    study_dir, figure_dir = Path(sys.argv[1]), Path(sys.argv[2])
    figure_dir.mkdir(parents=True, exist_ok=True)
    grad_map_pair(study_dir, figure_dir / "findings_grad_map.png")
    drift_chart(study_dir, figure_dir / "findings_drift.png")
    print(f"figures: {figure_dir / 'findings_grad_map.png'}, {figure_dir / 'findings_drift.png'}")
