"""Checkpoints that survive a crash: written to a temporary file, then atomically renamed."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from capsexp.errors import UserError, disk_error

FORMAT = "capsexp-checkpoint-1"
# the temporaries save_checkpoint and link_checkpoint write beside their target: mkstemp's name
# (prefix, 8 characters from its alphabet, suffix) and the link's fixed name; only these are ours
TEMPORARY = re.compile(r"^\.[^/]+\.pt\.(?:[a-z0-9_]{8}|link)\.tmp$")
FULL_DISK_BYTES = 1 << 20  # less free than this after a failed torch.save: the disk was full


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves the previous file intact.

    The file is flushed to disk, renamed over ``path`` and the folder synced, so the new name
    survives a power cut too. A disk that refuses the write (full, read-only, not ours) is one
    sentence naming ``path``; the previous checkpoint stays as it was.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise disk_error(path, exc) or exc from None
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
        sync_folder(path.parent)
    except BaseException as exc:
        # torch's writer may say only "unexpected pos": then the free space tells (read before
        # the temporary is deleted and its blocks are free again)
        full = isinstance(exc, RuntimeError) and "inline_container" in str(exc) and _disk_is_full(path.parent)
        Path(tmp).unlink(missing_ok=True)
        kept = "the previous checkpoint is intact" if path.exists() else "no checkpoint was kept"
        error = disk_error(path, exc, kept) if isinstance(exc, Exception) else None
        if error is None and full:
            error = UserError(f"could not write '{path}': no space left on device; {kept}.")
        if error is not None:
            raise error from None
        raise


def _disk_is_full(folder: Path) -> bool:
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < FULL_DISK_BYTES


def sync_folder(folder: Path) -> None:
    """fsync a folder, so a rename inside it is on disk (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems do not sync folders; the rename itself stays atomic
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporaries a killed ``save_checkpoint``/``link_checkpoint`` left in ``folder``.

    Call only while holding the run folder's lock: then no write of ours is in progress there.
    Returns what was removed.
    """
    removed = []
    for path in sorted(folder.glob(".*.tmp")) if folder.is_dir() else []:
        if TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def link_checkpoint(source: Path, path: Path) -> None:
    """Make ``path`` the same checkpoint as ``source`` (``best.pt`` when it equals ``last.pt``).

    A hard link costs no second write of a few hundred MB; the later replacement of ``source``
    by ``save_checkpoint`` gives ``source`` a new file and leaves ``path`` as it was. Falls back
    to a copy where the file system has no hard links. Atomic like ``save_checkpoint``.
    """
    tmp = path.with_name(f".{path.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(path, exc, f"'{source}' is intact") or exc from None
    sync_folder(path.parent)


def read_torch_file(path: str | Path, key: str, missing: str, unreadable: str, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU, tensors and plain containers only (no code runs from the file).

    A missing or unreadable file is one sentence: ``<key>: <missing>`` or ``<key>: <unreadable>``,
    where ``{path}`` and ``{error}`` are filled in. ``mmap``: map the file, reading only what is used.
    """
    if not Path(path).is_file():
        raise UserError(f"{key}: " + missing.format(path=path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise UserError(f"{key}: " + unreadable.format(path=path, error=type(exc).__name__)) from None


def load_checkpoint(path: str | Path, key: str = "trainer.resume", mmap: bool = False) -> dict[str, Any]:
    """Read a capsexp checkpoint; anything else (missing, truncated, foreign) is one clear sentence."""
    state = read_torch_file(path, key, "no checkpoint at '{path}'.",
                            "'{path}' is not a readable checkpoint (truncated or corrupt: {error}); "
                            "resume from another file, e.g. checkpoints/best.pt where the run kept one.", mmap)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{key}: '{path}' is not a capsexp checkpoint.")
    return state


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written checkpoint in a run folder (for ``trainer.resume=auto``)."""
    # best.pt may be a hard link to last.pt (same mtime): on a tie, last.pt
    found = sorted((run_dir / "checkpoints").glob("*.pt"), key=lambda p: (p.stat().st_mtime, p.name == "last.pt"))
    return found[-1] if found else None
