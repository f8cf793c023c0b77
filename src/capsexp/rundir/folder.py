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
from capsexp.errors import UserError, disk_error

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
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path, text in ((run_dir / CONFIG_FILE, resolved),
                           (run_dir / ENVIRONMENT_FILE, json.dumps(environment(), indent=2) + "\n")):
            _replace(path, text)
    except OSError as exc:
        raise disk_error(path, exc) or exc from None
    return resolved


def _replace(path: Path, text: str) -> None:
    """Write ``path`` in one step (a temporary, then a rename): a full disk leaves the old file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """``metrics.json``, replaced in one step: a reader (``capsexp report``) never sees half a file."""
    # strict JSON: a value never measured (throughput of a run shorter than its warm-up) is null
    on_disk = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    try:
        _replace(run_dir / METRICS_FILE, json.dumps(on_disk, indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise disk_error(run_dir / METRICS_FILE, exc, "the checkpoints are intact") or exc from None
    return run_dir / METRICS_FILE


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)
