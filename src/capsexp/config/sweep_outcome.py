"""A sweep runs every job: a job that fails is recorded and named at the end, not the end of the sweep.

Inside a sweep's job, a user's mistake or a stopped run (its one sentence already printed) is written
to ``failed.json`` in the job's folder, and the job returns, so the launcher goes on to the next one.
``SweepOutcome``, a Hydra callback of the sweep's own process, reads those records when the sweep
ends; ``capsexp train -m`` then exits 1 naming the failed jobs. An interrupted job (Ctrl-C, a
scheduler's signal) still ends the sweep: the user asked it to stop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from capsexp.rundir.files import write_atomic

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


class SweepOutcome(Callback):
    """Hydra callback (``hydra.callbacks`` in conf/config.yaml): collects the failed jobs of a sweep."""

    def on_multirun_start(self, config: Any, **kwargs: Any) -> None:
        FAILED.clear()

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        FAILED.clear()
        FAILED.extend(failed_jobs(Path(str(config.hydra.sweep.dir))))
