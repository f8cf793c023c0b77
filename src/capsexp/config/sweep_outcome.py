"""A sweep runs every job: a job that fails is recorded and named at the end, not the end of the sweep.

Before Hydra writes ``multirun.yaml``, ``SweepOutcome`` also refuses a sweep folder that is not
this sweep's: a folder with other files in it, or one holding a sweep made with other fixed values.

Inside a sweep's job, a user's mistake or a stopped run (its one sentence already printed) is written
to ``failed.json`` in the job's folder, and the job returns, so the launcher goes on to the next one.
``SweepOutcome``, a Hydra callback of the sweep's own process, reads those records when the sweep
ends; ``capsexp train -m`` then exits 1 naming the failed jobs. An interrupted job (Ctrl-C, a
scheduler's signal) still ends the sweep: the user asked it to stop.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from capsexp.rundir.files import safe_yaml, write_atomic

FAILED_FILE = "failed.json"
FAILED: list[tuple[str, str]] = []  # (job folder, reason) of the sweep that just ended, in this process


def record_failure(job_dir: Path, message: str, exit_code: int) -> None:
    """``failed.json`` in a job's folder, when the folder is one capsexp may write into."""
    from capsexp.rundir.folder import made_by_capsexp

    if job_dir.is_dir() and not job_dir.is_symlink() and made_by_capsexp(job_dir):
        write_atomic(job_dir / FAILED_FILE, json.dumps({"status": "failed", "reason": message,
                                                        "exit_code": exit_code}, indent=2) + "\n")


def read_failure(job_dir: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((job_dir / FAILED_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def failed_jobs(sweep_dir: Path) -> list[tuple[str, str]]:
    """``(job folder, reason)`` of every job below ``sweep_dir`` that recorded a failure."""
    out = []
    for record in sorted(sweep_dir.glob(f"*/{FAILED_FILE}")):
        found = read_failure(record.parent) or {}
        out.append((record.parent.name, str(found.get("reason", "unknown"))))
    return out


def _fixed(task: list[str]) -> dict[str, str]:
    """The overrides that make every job of the sweep what it is: ``key -> value`` for the keys given
    one value (a swept key's values may change: each value has its own job folder), without the keys
    a resume may change (the run's length, ``trainer.resume``, how it is shown)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from capsexp.runkeys import role

    out = {}
    for override in OverridesParser.create().parse_overrides(task):
        if not override.is_sweep_override() and not role(override.key_or_group.lstrip("+~")).continuable:
            out[override.key_or_group] = override.get_value_element_as_str()
    return out


def check_sweep_folder(sweep_dir: Path, task: list[str]) -> None:
    """Raise UserError when ``sweep_dir`` holds anything but an earlier run of this same sweep."""
    from capsexp.errors import UserError

    record = sweep_dir / "multirun.yaml"
    if sweep_dir.is_symlink() or (sweep_dir.exists() and not sweep_dir.is_dir()):
        raise UserError(f"hydra.sweep.dir '{sweep_dir}' is not a folder; set hydra.sweep.dir to a new folder.")
    if not sweep_dir.is_dir() or not any(sweep_dir.iterdir()):
        return
    try:
        recorded = safe_yaml(record.read_text())["hydra"]["overrides"]["task"]
        before = _fixed([str(item) for item in recorded])
    except Exception as exc:  # noqa: BLE001 -- missing, unreadable or not Hydra's: not a sweep's record
        raise UserError(f"hydra.sweep.dir '{sweep_dir}' already holds files that are not a capsexp sweep's "
                        f"(no readable multirun.yaml); set hydra.sweep.dir to a new folder.") from exc
    now = _fixed(task)
    changed = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    if changed:
        def said(fixed: dict[str, str]) -> str:
            return ", ".join(f"{k}={fixed[k]}" if k in fixed else f"no {k}" for k in changed)

        raise UserError(f"hydra.sweep.dir '{sweep_dir}' holds a sweep made with {said(before)}, and this one has "
                        f"{said(now)}. "
                        f"A sweep folder continues only the same sweep (its swept values, trainer.resume and "
                        f"the run length may change): set hydra.sweep.dir to a new folder.")


class SweepOutcome(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): refuses a sweep folder that is not
    this sweep's (before Hydra writes into it), and collects the failed jobs of a sweep."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        from capsexp.errors import UserError, say_error

        FAILED.clear()
        try:
            check_sweep_folder(Path(str(config.hydra.sweep.dir)), list(config.hydra.overrides.task))
        except UserError as exc:  # Hydra would wrap it in its own report: one sentence, and nothing written
            say_error(exc)
            sys.exit(2)

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        FAILED.clear()
        FAILED.extend(failed_jobs(Path(str(config.hydra.sweep.dir))))
