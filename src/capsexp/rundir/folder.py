"""The files of a run folder besides checkpoints and TensorBoard events.

``config.yaml`` (the resolved configuration) and ``environment.json`` (the versions) are written
when a run starts, ``metrics.json`` when it ends; a folder that already holds a run is refused,
so a finished run is never overwritten.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from capsexp import __version__
from capsexp.errors import UserError, disk_error
from capsexp.rundir.files import refuse_link, write_atomic
from capsexp.rundir.lock import LOCK_FILE, refuse_if_held

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


def made_by_capsexp(run_dir: Path) -> bool:
    """Whether capsexp made this folder: its ``environment.json`` names capsexp. (An empty folder
    counts: there is nothing in it to lose.)"""
    try:
        if all(entry.name == LOCK_FILE for entry in run_dir.iterdir()):  # the lock of the run now starting
            return True
        found = json.loads((run_dir / ENVIRONMENT_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and "capsexp" in found


def check_name_lengths(folder: Path) -> None:
    """Each part of the run folder's path must fit the file system's limit on a name (255 bytes on most)."""
    existing = next((p for p in [folder.absolute(), *folder.absolute().parents] if os.path.exists(p)), Path("/"))
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    for part in folder.parts:
        if len(os.fsencode(part)) > limit:
            raise UserError(f"hydra.run.dir: the name '{part[:40]}...' is {len(os.fsencode(part))} bytes long; the "
                            f"file system allows {limit}. Choose a shorter folder name.")


def refuse_foreign_folder(run_dir: Path) -> None:
    """capsexp writes only into folders it made: a user's own folder is never written into."""
    if run_dir.is_symlink() or (run_dir.exists() and not run_dir.is_dir()):
        kind = "a symbolic link" if run_dir.is_symlink() else "a file"
        raise UserError(f"the run folder '{run_dir}' is {kind}, not a folder; set hydra.run.dir to a new folder.")
    if run_dir.is_dir() and not made_by_capsexp(run_dir):
        refuse_if_held(run_dir)  # a run starting there: in use, not foreign
        raise UserError(f"the run folder '{run_dir}' already holds files that capsexp did not write; capsexp "
                        f"writes only into new folders and its own run folders. Set hydra.run.dir to a new folder.")


def refuse_taken_folder(run_dir: Path) -> None:
    """A folder that already holds a run (metrics or a checkpoint) is never trained into afresh, and a
    folder capsexp did not make is never written into."""
    refuse_foreign_folder(run_dir)
    if (run_dir / METRICS_FILE).exists() or any((run_dir / "checkpoints").glob("*.pt")):
        raise UserError(f"the run folder '{run_dir}' already holds a run; capsexp never overwrites one. "
                        f"Use trainer.resume=auto to continue it, or start a new run.")


LOG_FILE = "cli.log"  # Hydra's name for it (the job's name): kept for runs made before capsexp opened it
LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"  # Hydra's default job logging format


def start_run_record(run_dir: Path, cfg: DictConfig) -> None:
    """Once a run is accepted: Hydra's record of it (``.hydra/config.yaml``, ``hydra.yaml``,
    ``overrides.yaml``, as Hydra writes them) and the log file ``cli.log``. Hydra is told to write
    neither (``capsexp.config.argv.records_by_capsexp``), so a refused run leaves its folder as it was.
    Outside a Hydra job (tests calling ``train``) there is no Hydra record to write."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized() or HydraConfig.get().output_subdir is not None:
        return
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.job_logging is not None and "file" in (hydra_cfg.job_logging.get("handlers") or {}):
        return  # Hydra's own logging config, with its own file: already open
    records = run_dir / ".hydra"
    try:
        records.mkdir(parents=True, exist_ok=True)
        for name, node in (("config.yaml", cfg), ("hydra.yaml", OmegaConf.create({"hydra": hydra_cfg})),
                           ("overrides.yaml", hydra_cfg.overrides.task)):
            write_atomic(records / name, OmegaConf.to_yaml(node))
        log = run_dir / LOG_FILE
        refuse_link(log)
        handler = logging.FileHandler(log)
    except OSError as exc:
        raise disk_error(records, exc) or exc from None
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.getLogger().addHandler(handler)


def write_run_record(run_dir: Path, cfg: DictConfig) -> str:
    """Create the folder and write ``config.yaml`` and ``environment.json``; return the resolved YAML."""
    resolved = OmegaConf.to_yaml(cfg, resolve=True)
    path = run_dir
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for path, text in ((run_dir / CONFIG_FILE, resolved),
                           (run_dir / ENVIRONMENT_FILE, json.dumps(environment(), indent=2) + "\n")):
            write_atomic(path, text)
    except OSError as exc:
        raise disk_error(path, exc) or exc from None
    return resolved


def write_metrics(run_dir: Path, metrics: dict[str, Any]) -> Path:
    """``metrics.json``, replaced in one step: a reader (``capsexp report``) never sees half a file."""
    # strict JSON: a value never measured (throughput of a run shorter than its warm-up) is null
    on_disk = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
    try:
        write_atomic(run_dir / METRICS_FILE, json.dumps(on_disk, indent=2, allow_nan=False) + "\n")
    except OSError as exc:
        raise disk_error(run_dir / METRICS_FILE, exc, "the checkpoints are intact") or exc from None
    return run_dir / METRICS_FILE

