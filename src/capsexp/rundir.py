"""The files of a run folder besides checkpoints and TensorBoard events.

``config.yaml`` (the resolved configuration) and ``environment.json`` (the versions) are written
when a run starts, ``metrics.json`` when it ends; a folder that already holds a run is refused,
so a finished run is never overwritten.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from capsexp import __version__
from capsexp.errors import UserError

METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"
ENVIRONMENT_FILE = "environment.json"


def output_dir() -> Path:
    """The Hydra run folder when Hydra runs us; tests pass ``run_dir`` instead."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)


def environment() -> dict[str, str]:
    import hydra
    import torch
    import torchvision

    # plain str: torch's TorchVersion would make checkpoints unreadable by torch.load(weights_only=True)
    return {"capsexp": __version__, "torch": str(torch.__version__), "torchvision": str(torchvision.__version__),
            "hydra": hydra.__version__, "python": sys.version.split()[0]}


def refuse_taken_folder(run_dir: Path) -> None:
    """A folder that already holds a run (metrics or a checkpoint) is never trained into afresh."""
    if (run_dir / METRICS_FILE).exists() or any((run_dir / "checkpoints").glob("*.pt")):
        raise UserError(f"the run folder '{run_dir}' already holds a run; capsexp never overwrites one. "
                        f"Use trainer.resume=auto to continue it, or start a new run.")


def write_run_record(run_dir: Path, cfg: DictConfig) -> str:
    """Create the folder and write ``config.yaml`` and ``environment.json``; return the resolved YAML."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    (run_dir / CONFIG_FILE).write_text(resolved)
    (run_dir / ENVIRONMENT_FILE).write_text(json.dumps(environment(), indent=2) + "\n")
    return resolved


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """``metrics.json``, replaced in one step: a reader (``capsexp report``) never sees half a file."""
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    # strict JSON: a value never measured (throughput of a run shorter than its warm-up) is null
    on_disk = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    tmp.write_text(json.dumps(on_disk, indent=2, allow_nan=False) + "\n")
    os.replace(tmp, run_dir / METRICS_FILE)
    return run_dir / METRICS_FILE


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
