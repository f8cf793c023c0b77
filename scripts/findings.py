"""The Findings study: each of the seed scenario's five claims, tested by a paired comparison that can fail.

    python scripts/findings.py                    # the CPU profile (ResNet18, 64 px, 3 seeds)
    python scripts/findings.py --profile gpu      # the seed's scale: ResNet50, 224 px (one GPU)
    python scripts/findings.py --profile gpu --tiny --out /tmp/g   # the gpu profile's path at toy size, on a CPU

1. pretrain: a backbone with the FC head, trained on the built-in shapes until validation accuracy
   plateaus (the criterion is checked and stated in the page);
2. fine-tune: every arm below, from that backbone, once per seed. A seed gives every arm the same
   backbone, the same data order and the same validation images, so arms are compared seed by seed;
3. docs: docs/findings.md (every table and figure) and the README's summary, from the runs alone.

A run whose metrics.json says completed is skipped; an interrupted one continues from its checkpoint
(trainer.resume=auto); a run that left no checkpoint starts again. A rerun with everything finished
only regenerates the tables and figures. Runs go to ``--out`` (default outputs/findings/<profile>).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from capsexp.cli import forked, warm_processes  # noqa: E402


@dataclass(frozen=True)
class Arm:
    """One configuration of the study; ``overrides`` add to the profile's fine-tuning overrides."""

    name: str
    overrides: tuple[str, ...]
    label: str


CAPSULE = ("head=capsule", "adapter=conv")
ARMS = [
    Arm("fc", ("head=fc",), "FC head (global pooling + linear)"),
    Arm("dynamic", CAPSULE, "capsule, dynamic routing, 3 iterations, conv adapter, margin loss"),
    Arm("attention", (*CAPSULE, "head.routing.name=attention"), "capsule, attention routing, 3 iterations, conv, ce"),
    Arm("self", (*CAPSULE, "head.routing.name=self"), "capsule, self routing, conv, ce"),
    Arm("em", (*CAPSULE, "head.routing.name=em"), "capsule, EM routing, 3 iterations, conv, spread loss"),
    Arm("dynamic-r1", (*CAPSULE, "head.routing.iterations=1"), "dynamic, 1 iteration (uniform coupling)"),
    Arm("attention-r1", (*CAPSULE, "head.routing.name=attention", "head.routing.iterations=1"),
        "attention, 1 iteration (uniform coupling)"),
    Arm("em-r1", (*CAPSULE, "head.routing.name=em", "head.routing.iterations=1"), "EM, 1 iteration"),
    Arm("dynamic-scale100", (*CAPSULE, "head.routing.logit_scale=100"), "dynamic, logit_scale 100"),
    Arm("pooled", ("head=capsule", "adapter=none", "head.primary.pooled=true"),
        "capsule, primary capsules averaged over positions (the seed's code)"),
    Arm("none", ("head=capsule", "adapter=none"), "capsule, adapter none"),
    Arm("linear", ("head=capsule", "adapter=linear"), "capsule, adapter linear"),
    Arm("ce", (*CAPSULE, "loss=ce"), "dynamic, conv, cross-entropy on the lengths"),
    Arm("spread", (*CAPSULE, "loss=spread"), "dynamic, conv, spread loss"),
    Arm("reinit-fc", ("head=fc", "backbone.reinit=[stem,layer1]"), "FC, stem and layer1 re-initialised, AdamW"),
    Arm("reinit-dynamic", (*CAPSULE, "backbone.reinit=[stem,layer1]"), "dynamic, stem and layer1 re-initialised, AdamW"),
    *(Arm(f"reinit-{r}", (*CAPSULE, f"head.routing.name={r}", "backbone.reinit=[stem,layer1]"),
          f"{r}, stem and layer1 re-initialised, AdamW") for r in ("attention", "self", "em")),
    *(Arm(f"reinit-{head}-sgd{lr}", (*over, "backbone.reinit=[stem,layer1]", "optim=sgd", f"optim.lr={lr}"),
          f"{head}, stem and layer1 re-initialised, SGD lr {lr}")
      for head, over in (("fc", ("head=fc",)), ("dynamic", CAPSULE)) for lr in ("0.01", "0.05")),
]
ARM = {arm.name: arm for arm in ARMS}


@dataclass(frozen=True)
class Profile:
    name: str
    pretrain: tuple[str, ...]   # the pretraining run's overrides
    finetune: tuple[str, ...]   # every fine-tuning run's overrides (before the arm's)
    seeds: tuple[int, ...]
    jobs: int                   # runs at once
    threads: int                # torch threads per run
    device: str                 # what the page names as the hardware


SHARED = ("trainer.progress=false", "grads.per_layer=false", "grads.figure_every_n_steps=0")
PROFILES = {
    # 2 jobs of one thread on a 2-core CPU; 30 steps of 32 per epoch, 5 epochs, 1000 validation images
    "cpu": Profile("cpu",
                   ("backbone=resnet18", "head=fc", "data.image_size=64", "data.train_size=4000", "data.val_size=1000",
                    "trainer.max_epochs=12", "grads.probe.images=0", "grads.drift.probe_images=0", "seed=0"),
                   ("backbone=resnet18", "data.image_size=64", "data.batch_size=32", "data.train_size=960",
                    "data.val_size=1000", "trainer.max_epochs=5", "grads.log_every_n_steps=5", "optim.warmup_steps=10"),
                   (0, 1, 2), 2, 1, "a shared 2-core CPU (no GPU)"),
    # the seed's geometry: ResNet50, 224 px, a 7x7 map; 4 runs share one GPU
    "gpu": Profile("gpu",
                   ("backbone=resnet50", "head=fc", "data.image_size=224", "data.batch_size=64", "data.train_size=8000",
                    "data.val_size=2000", "trainer.max_epochs=8", "grads.probe.images=0", "grads.drift.probe_images=0",
                    "data.num_workers=2", "seed=0"),
                   ("backbone=resnet50", "data.image_size=224", "data.batch_size=32", "data.train_size=2048",
                    "data.val_size=2000", "trainer.max_epochs=6", "grads.log_every_n_steps=8", "optim.warmup_steps=10",
                    "data.num_workers=2"),
                   (0, 1, 2), 4, 3, "one GPU"),
}
# --tiny: the same path at toy size (tests, and the gpu profile's check on a CPU)
TINY = (("data.image_size=32", "data.train_size=32", "data.val_size=16", "data.batch_size=8", "trainer.max_epochs=1",
         "trainer.device=cpu"),
        ("data.image_size=32", "data.train_size=16", "data.val_size=16", "data.batch_size=8", "trainer.max_epochs=2",
         "grads.log_every_n_steps=1", "optim.warmup_steps=1", "grads.probe.images=8", "grads.drift.probe_images=8",
         "trainer.device=cpu", "data.num_workers=0"))


def finished(run: Path) -> bool:
    try:
        return json.loads((run / "metrics.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


def launch(run: Path, overrides: list[str], threads: int, log: Path) -> float:
    """Run (or continue) one training run into ``run``; its wall seconds. A failure stops the study."""
    resume = []
    if run.exists():
        if any((run / "checkpoints").glob("*.pt")):
            resume = ["trainer.resume=auto"]
        else:  # it stopped before its first checkpoint: nothing to continue
            shutil.rmtree(run)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.monotonic()
    # `capsexp train ... >>log 2>&1`, forked from a process that has imported capsexp once (4 s less a run)
    proc = warm_processes().Process(target=forked, args=(["train", *overrides, *resume, f"hydra.run.dir={run}"],
                                                         str(ROOT), env, str(log), str(log)))
    proc.start()
    proc.join()
    code = proc.exitcode
    if code != 0 or not finished(run):
        raise SystemExit(f"findings: the run in {run} stopped (exit {code}); its output is in {log}. "
                         "Fix the cause and rerun: finished runs are kept.")
    return time.monotonic() - start


def run_study(profile: Profile, out: Path, arms: list[Arm]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    timings_file = out / "timings.json"
    timings = json.loads(timings_file.read_text()) if timings_file.exists() else {}

    def once(key: str, run: Path, overrides: list[str], threads: int = profile.threads) -> None:
        if finished(run):
            return
        print(f"findings: {key}\n", end="", flush=True)  # one write: two threads print at once
        timings[key] = timings.get(key, 0.0) + launch(run, overrides, threads, out / "runs.log")
        tmp = timings_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(timings, indent=1, sort_keys=True))
        tmp.replace(timings_file)

    pretrain = out / "pretrain"
    once("pretrain", pretrain, [*SHARED, *profile.pretrain], profile.jobs * profile.threads)  # alone: every core
    weights = f"backbone.weights={pretrain / 'checkpoints' / 'last.pt'}"
    jobs = [(f"{arm.name}/seed{seed}", out / arm.name / f"seed{seed}",
             [*SHARED, *profile.finetune, weights, *arm.overrides, f"seed={seed}"])
            for seed in profile.seeds for arm in arms]  # seed by seed: a stopped study has whole seeds
    with ThreadPoolExecutor(profile.jobs) as pool:
        for future in [pool.submit(once, *job) for job in jobs]:
            future.result()


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the profile's path at toy size, on the CPU")
    parser.add_argument("--out", type=Path, help="the study folder (default outputs/findings/<profile>)")
    parser.add_argument("--docs", type=Path, help="where findings.md and its figures go (default docs/, or "
                                                     "<out>/docs for --tiny and the gpu profile)")
    parser.add_argument("--readme", type=Path, help="the README whose summary is replaced (default README.md "
                                                       "for the full cpu profile, else none)")
    parser.add_argument("--arms", help="comma-separated arm names (default all): " + ", ".join(ARM))
    parser.add_argument("--seeds", help="comma-separated seeds (default the profile's)")
    args = parser.parse_args(argv)
    profile = PROFILES[args.profile]
    if args.tiny:
        profile = replace(profile, pretrain=(*profile.pretrain, *TINY[0]), finetune=(*profile.finetune, *TINY[1]),
                          seeds=profile.seeds[:2], jobs=1, threads=1, device="a CPU (--tiny)")
    if args.seeds:
        try:
            profile = replace(profile, seeds=tuple(int(s) for s in args.seeds.split(",")))
        except ValueError:
            raise SystemExit(f"findings: --seeds: '{args.seeds}' is not a comma-separated list of integers, "
                             f"e.g. 0,1,2.") from None
    unknown = [a for a in (args.arms or "").split(",") if a and a not in ARM]
    if unknown:
        raise SystemExit(f"findings: --arms: unknown {', '.join(unknown)}; the arms are {', '.join(ARM)}.")
    arms = [ARM[a] for a in args.arms.split(",")] if args.arms else ARMS
    full = profile.name == "cpu" and not args.tiny
    out = args.out or ROOT / "outputs" / "findings" / (profile.name + ("-tiny" if args.tiny else ""))
    docs = args.docs or (ROOT / "docs" if full else out / "docs")
    readme = args.readme or (ROOT / "README.md" if full else None)
    if readme is not None and not readme.is_file():  # found before hours of runs, not after
        raise SystemExit(f"findings: --readme: no file at '{readme}'; give the README whose summary (between "
                         f"<!-- findings:start --> and <!-- findings:end -->) is replaced.")
    from findings_doc import write_docs  # the analysis and the page (matplotlib: not in every run's process)

    started = time.monotonic()
    run_study(profile, out, arms)
    write_docs(out, docs, readme, profile, arms, ARMS)
    print(f"findings: {out} ({time.monotonic() - started:.0f} s); the page: {docs / 'findings.md'}")


if __name__ == "__main__":
    main(sys.argv[1:])
