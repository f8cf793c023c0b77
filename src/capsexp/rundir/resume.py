"""``trainer.resume``: resume continues *the same run*.

The rule, checked against the config saved in the checkpoint: every key keeps the value the run
was made with, except those in ``CONTINUABLE``, which say how long the run is, where and how it
is computed, what it shows and logs, and what happens on a fault. Those are applied (and
``config.yaml`` is rewritten to say so); any other difference is refused in one sentence that
lists each key with both values. A key the checkpoint does not know (it predates that key) is
not compared; for a group whose option changed (``head=fc`` to ``head=capsule``), the option is
named and its other keys are not listed.

A run with nothing left to train (its checkpoint's step and epoch have reached
``trainer.max_steps`` / ``trainer.max_epochs``) is not run again: one line says so and nothing
is written; raising either key extends it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from capsexp.rundir.checkpoint import load_checkpoint, newest_checkpoint
from capsexp.runkeys import keys_where
from capsexp.errors import UserError
from capsexp.rundir.folder import METRICS_FILE, refuse_foreign_folder, refuse_taken_folder

# the keys a resumed run may change, each with its descendants; every other key is the run's
# meaning (data, model, loss, optimizer and schedule, seed, batch and epoch size, clipping, what
# validation measures) and must stay as the checkpoint says
CONTINUABLE: tuple[str, ...] = keys_where("continuable")  # capsexp.runkeys: the one table
OPTION_GROUPS = ("backbone", "adapter", "head", "loss", "data", "optim")


class NothingToDo(Exception):
    """The run asked for is already complete; ``str()`` is the line to print, ``metrics`` what it
    recorded (empty when it has no ``metrics.json``)."""

    def __init__(self, message: str, metrics: dict[str, Any]) -> None:
        super().__init__(message)
        self.metrics = metrics


def continuable(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in CONTINUABLE)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def changed_keys(old: dict[str, Any], cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """``(key, value in the checkpoint, value asked for)`` for every difference the rule refuses."""
    before, now = _flat(old), _flat(OmegaConf.to_container(cfg, resolve=True))
    swapped = {g for g in OPTION_GROUPS if f"{g}.name" in before and before[f"{g}.name"] != now.get(f"{g}.name")}
    out = []
    for key, value in now.items():
        group = key.split(".", 1)[0]
        if key not in before or continuable(key) or (group in swapped and key != f"{group}.name"):
            continue
        if before[key] != value:
            out.append((key, before[key], value))
    return out


def _shown(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_same_run(old: dict[str, Any], cfg: DictConfig) -> None:
    """Refuse a resume that would change what the run is (see the module's rule)."""
    diff = changed_keys(old, cfg)
    if diff:
        was = ", ".join(f"{k}={_shown(a)}" for k, a, _ in diff)
        now = ", ".join(f"{k}={_shown(b)}" for k, _, b in diff)
        raise UserError(f"trainer.resume: this run was made with {was}; the resumed run asks for {now}. "
                        f"Resume continues the same run: drop those overrides, or start a new run.")


def check_classes(ckpt: dict[str, Any], cfg: DictConfig, num_classes: int) -> None:
    if ckpt.get("num_classes") != num_classes:
        raise UserError(f"trainer.resume: the checkpoint has {ckpt.get('num_classes')} classes, "
                        f"data.name={cfg.data.name} has {num_classes}.")


def _metrics(run_dir: Path | None) -> dict[str, Any]:
    try:
        found = json.loads((run_dir / METRICS_FILE).read_text()) if run_dir is not None else {}
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def resume_checkpoint(cfg: DictConfig, run_dir: Path | None) -> Path | None:
    """The checkpoint to continue from (None: a fresh run); a fresh run into a taken folder, a
    resume of another run into it, and a finished run without checkpoints are refused.
    ``run_dir`` None: the folder is not known yet (only an explicit path can be checked)."""
    resume = cfg.trainer.resume
    if run_dir is not None:
        refuse_foreign_folder(run_dir)
    if resume is None:
        if run_dir is not None:
            refuse_taken_folder(run_dir)
        return None
    if str(resume) != "auto":
        path = Path(str(resume))
        if run_dir is not None and not _inside(path, run_dir / "checkpoints"):
            _refuse_other_run(run_dir, path)
        return path
    if run_dir is None:
        return None
    found = newest_checkpoint(run_dir)  # nothing yet: a fresh start (pre-emptible jobs rerun as is)
    metrics = _metrics(run_dir)
    if found is None and (run_dir / METRICS_FILE).exists() and metrics.get("status") != "completed":
        raise UserError(f"trainer.resume=auto: the run in '{run_dir}' ended ({metrics.get('status', 'unknown')}) "
                        f"without a checkpoint (trainer.checkpoints=none), so it cannot be continued; "
                        f"start a new run.")
    if found is None and metrics.get("status") == "completed":
        raise NothingToDo(f"capsexp: the run in '{run_dir}' is complete and kept no checkpoint "
                          f"(trainer.checkpoints=none); nothing was changed.", metrics)
    return found


def _inside(path: Path, folder: Path) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
    except ValueError:
        return False
    return True


def _refuse_other_run(run_dir: Path, path: Path) -> None:
    try:
        refuse_taken_folder(run_dir)
    except UserError:
        raise UserError(f"trainer.resume: the run folder '{run_dir}' already holds another run, which "
                        f"continuing '{path}' there would overwrite; continue it in a new folder, or use "
                        f"trainer.resume=auto to continue the run in '{run_dir}'.") from None


def check_left_to_do(ckpt: dict[str, Any], cfg: DictConfig, run_dir: Path | None, path: Path) -> None:
    """Raise ``NothingToDo`` when the checkpoint's run has no step left under this config."""
    state = ckpt.get("state", {})
    step, epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
    max_steps, max_epochs = cfg.trainer.max_steps, cfg.trainer.max_epochs
    if (max_steps is None or step < int(max_steps)) and (max_epochs is None or epoch < int(max_epochs)):
        return
    where = f"the run in '{run_dir}'" if run_dir is not None and _inside(path, run_dir) else f"'{path}'"
    raise NothingToDo(f"capsexp: {where} is complete at step {step}, epoch {epoch} (trainer.max_steps="
                      f"{_shown(max_steps)}, trainer.max_epochs={_shown(max_epochs)}); nothing was changed. "
                      f"Raise trainer.max_epochs or trainer.max_steps to extend it.",
                      _metrics(run_dir) if where != f"'{path}'" else {})


def open_resume(cfg: DictConfig, run_dir: Path | None, *, lazy: bool = False) -> dict[str, Any] | None:
    """The checkpoint this run continues (None for a fresh run), checked against the rule; raises
    ``NothingToDo`` for a complete run. ``lazy``: map the file instead of reading it (what the
    command-line check needs is its config and counters)."""
    path = resume_checkpoint(cfg, run_dir)
    if path is None:
        return None
    ckpt = load_checkpoint(path, mmap=lazy)
    check_same_run(ckpt.get("config", {}), cfg)
    check_left_to_do(ckpt, cfg, run_dir, path)
    return ckpt
