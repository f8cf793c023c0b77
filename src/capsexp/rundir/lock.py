"""One run per folder: ``.capsexp.lock`` in the run folder while a run trains there.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic: of two processes, exactly one
creates it) and holds the owner's pid, host and process start time. It is removed when the run
ends, whether it ends well or with an error. A lock left by a process that was killed (no
``finally`` ran) is recognised as stale when its host is this host and its process no longer
exists (or the pid now belongs to a younger process), and is taken over with a warning. A lock
from another host cannot be checked from here: the message names it, so the user can delete it.

Under torchrun only rank 0 takes the lock; the other ranks belong to the same run.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from capsexp.errors import UserError, disk_error

LOCK_FILE = ".capsexp.lock"
STALE_EMPTY_SECONDS = 30.0  # an empty lock this old was never finished by its creator (killed)
_HELD: dict[Path, int] = {}  # folders this process holds, and how many callers hold each


@contextmanager
def hold_run_folder(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir`` for this run (nested calls in one process share the lock); on entry,
    remove the temporaries an interrupted write left there."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    key = Path(os.path.abspath(run_dir))
    if key in _HELD:
        _HELD[key] += 1
        try:
            yield
        finally:
            _HELD[key] -= 1
        return
    lock = _acquire(run_dir)
    _HELD[key] = 1
    try:
        _remove_temporaries(run_dir)
        yield
    finally:
        del _HELD[key]
        _release(lock)


def refuse_if_held(run_dir: Path) -> None:
    """A folder whose lock a live capsexp run (not this process) holds is in use, whatever else it
    holds so far: a run that has just started has not written its record yet."""
    lock = run_dir / LOCK_FILE
    if not lock.is_file() or lock.is_symlink():
        return
    holder = _read(lock)
    if _ours(holder):
        return
    if not _stale(lock, holder):
        raise _in_use(run_dir, lock, holder)


def _record() -> dict[str, Any]:
    return {"pid": os.getpid(), "host": socket.gethostname(), "start": _start_time(os.getpid()),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def _acquire(run_dir: Path) -> Path:
    lock = run_dir / LOCK_FILE
    for _ in range(3):  # a stale lock taken over, then a retry; more means others race for it
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if lock.is_dir() and not lock.is_symlink():  # not a lock any run holds: a leftover
                raise UserError(f"'{lock}' is a folder where capsexp keeps its lock file, so no run holds it; "
                                f"remove that folder, or choose another run folder.") from None
            holder = _read(lock)
            if not _stale(lock, holder):
                raise _in_use(run_dir, lock, holder) from None
            _take_over(run_dir, lock, holder)
            continue
        except OSError as exc:
            raise disk_error(lock if run_dir.is_dir() else run_dir, exc) or exc from None
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(json.dumps(_record()) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            lock.unlink(missing_ok=True)
            raise disk_error(lock, exc) or exc from None
        return lock
    raise _in_use(run_dir, lock, _read(lock))


def _ours(holder: dict[str, Any] | None) -> bool:
    """Whether the lock's record is this process's."""
    return holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()


def _release(lock: Path) -> None:
    if _ours(_read(lock)):
        lock.unlink(missing_ok=True)


def _read(lock: Path) -> dict[str, Any] | None:
    """The lock's record; None while its creator is still writing it, or when it is damaged."""
    try:
        record = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("pid"), int) else None


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which a reused pid does not share."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the name before ")" may hold spaces


def _stale(lock: Path, holder: dict[str, Any] | None) -> bool:
    if holder is None:  # empty or damaged: stale only once its creator had ample time to write it
        try:
            return time.time() - lock.stat().st_mtime > STALE_EMPTY_SECONDS
        except OSError:
            return False
    if holder.get("host") != socket.gethostname():
        return False
    pid = int(holder["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's process
        return False
    started = holder.get("start")
    return started is not None and _start_time(pid) not in (None, started)


def _take_over(run_dir: Path, lock: Path, holder: dict[str, Any] | None) -> None:
    """Move the stale lock aside (one rename: of several takers, one wins) and check that what
    moved is the stale one, not a lock another process created in the meantime."""
    aside = lock.with_name(f"{LOCK_FILE}.{os.getpid()}.stale")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:  # another process took it over first; the retry meets its lock
        return
    except OSError as exc:
        raise disk_error(lock, exc) or exc from None
    if _read(aside) != holder:  # a live lock: put it back where it was
        try:
            os.link(aside, lock)
        except OSError:
            pass
        aside.unlink(missing_ok=True)
        return
    aside.unlink(missing_ok=True)
    who = f"pid {holder['pid']}" if holder else "a process that never finished writing it"
    print(f"capsexp: warning: took over the lock of '{run_dir}' left by {who}, which is no longer running.",
          file=sys.stderr, flush=True)


def _in_use(run_dir: Path, lock: Path, holder: dict[str, Any] | None) -> UserError:
    if holder is None:
        return UserError(f"the run folder '{run_dir}' is in use by another capsexp run (its lock file "
                         f"'{lock}' is being written); wait for that run to end, or choose another folder.")
    here = holder.get("host") == socket.gethostname()
    gone = "" if here else f" (if that run is gone, delete '{lock}')"
    return UserError(f"the run folder '{run_dir}' is in use by another capsexp run (pid {holder['pid']} on "
                     f"{holder.get('host')}, since {holder.get('since')}); wait for it to end{gone}, or choose "
                     f"another folder with hydra.run.dir.")


def _remove_temporaries(run_dir: Path) -> None:
    from capsexp.rundir.checkpoint import remove_stale_temporaries
    from capsexp.rundir.files import shown

    removed = remove_stale_temporaries(run_dir / "checkpoints")
    if removed:
        names = ", ".join(shown(p) for p in removed)
        print(f"capsexp: removed {names}, left by an interrupted checkpoint write.", file=sys.stderr, flush=True)
