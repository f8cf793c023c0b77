"""The runs below a folder, as ``capsexp report`` reads them: discovery and reading, nothing else."""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from capsexp.errors import UserError
from capsexp.rundir.files import safe_yaml
from capsexp.runkeys import keys_where
from capsexp.config.sweep_outcome import FAILED_FILE, read_failure
from capsexp.config.tree import flatten

IGNORED_KEYS = frozenset(keys_where("tells_runs_apart", False))  # capsexp.runkeys: the one table
ALARM_PREFIX = "alarm/"  # the text tags alarm/<condition>
EVENTS_PREFIX = "events.out.tfevents."  # TensorBoard's event file names
RUN_SUBFOLDERS = frozenset({"checkpoints", "tb", "grads"})


@dataclass
class Run:
    """What one run folder holds; ``metrics`` is None while it runs or after a crash."""

    path: Path
    name: str
    overrides: dict[str, str] | None  # .hydra/overrides.yaml; None for a run not launched by the CLI
    config: dict[str, Any]            # flattened, resolved
    metrics: dict[str, Any] | None
    scalars: dict[str, list[tuple[int, float]]]
    alarm: str | None                 # the alarm texts of the event files, joined


def _say_unread(exc: OSError) -> None:
    print(f"capsexp: warning: could not read '{exc.filename}' ({(exc.strerror or str(exc)).lower()}); "
          f"the runs inside it are not in the report.", file=sys.stderr, flush=True)


def find_runs(root: Path, unread: Callable[[OSError], None] = _say_unread) -> list[Path]:
    """Every folder at or below ``root`` holding event files (or ``tb/``) or ``metrics.json``; runs
    are not searched inside. A folder that cannot be listed goes to ``unread`` (by default a warning
    on stderr), never silently; ``root`` itself unreadable is a UserError."""
    def refused(exc: OSError) -> None:
        if Path(exc.filename) == root:
            raise UserError(f"could not read '{root}': {(exc.strerror or str(exc)).lower()}.")
        unread(exc)

    runs = []
    for here, subdirs, files in os.walk(root, onerror=refused):
        if "metrics.json" in files or FAILED_FILE in files or "tb" in subdirs or \
                any(f.startswith(EVENTS_PREFIX) for f in files):
            runs.append(Path(here))
            # a run's own folders hold no runs; a sweep made inside a run folder still does
            subdirs[:] = [d for d in subdirs if d not in RUN_SUBFOLDERS]
        # .hydra, .submitit and the like hold no runs
        subdirs[:] = [d for d in subdirs if not d.startswith(".")]
    return sorted(runs)


def parse_overrides(items: Iterable[Any]) -> dict[str, str]:
    """``key=value`` strings as a dict keyed like the config (``+key`` and ``key@pkg`` as ``key``)."""
    out = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.lstrip("+~").split("@")[0]
        if sep and key not in IGNORED_KEYS:
            out[key] = value
    return out


def _load(path: Path, parse: Callable[[str], Any]) -> Any:
    """A file's parsed content; None when absent, half-written or damaged."""
    try:
        return parse(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _accumulate(source: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(source), size_guidance={"scalars": 0, "tensors": 0, "images": 1, "histograms": 1})
    acc.Reload()
    tags = acc.Tags()
    scalars = {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in tags["scalars"]}
    alarms = [acc.Tensors(tag)[0].tensor_proto.string_val[0].decode("utf-8", "replace")
              for tag in sorted(tags["tensors"])  # add_text stores "<tag>/text_summary"
              if tag.startswith(ALARM_PREFIX) and acc.Tensors(tag)]
    return scalars, alarms


def read_events(tb: Path) -> tuple[dict[str, list[tuple[int, float]]], str | None]:
    """All scalar points and the alarm texts (joined) from a run's event files; nothing when unreadable.
    Only regular files are read: a FIFO or a device named like an event file would block the reader."""
    if not tb.is_dir():
        return {}, None
    try:
        files = sorted(f for f in tb.iterdir() if f.name.startswith(EVENTS_PREFIX))
        regular = [f for f in files if f.is_file()]
        if regular == files:
            scalars, alarms = _accumulate(tb)
        else:  # one file at a time, the others left alone
            scalars, alarms = {}, []
            for f in regular:
                more, found = _accumulate(f)
                for tag, points in more.items():
                    scalars[tag] = sorted(scalars.get(tag, []) + points)
                alarms += found
        return scalars, "; ".join(alarms) or None
    except Exception:  # noqa: BLE001 -- a file being written or damaged must not stop the report
        return {}, None


def read_run(path: Path, root: Path) -> Run:
    """Read one run folder; anything missing or unreadable is simply absent."""
    config = _load(path / "config.yaml", safe_yaml) or _load(path / ".hydra" / "config.yaml", safe_yaml)
    listed = _load(path / ".hydra" / "overrides.yaml", safe_yaml)
    metrics = _load(path / "metrics.json", json.loads) or read_failure(path)  # a sweep job that failed
    scalars, alarm = read_events(path / "tb" if (path / "tb").is_dir() else path)  # tb/: older runs
    name = path.relative_to(root).as_posix() if path != root else path.resolve().name
    return Run(path, name, parse_overrides(listed) if isinstance(listed, list) else None,
               flatten(config) if isinstance(config, dict) else {},
               metrics if isinstance(metrics, dict) else None, scalars, alarm)
