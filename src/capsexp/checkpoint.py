"""Checkpoints that survive a crash: written to a temporary file, then atomically renamed."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from capsexp.errors import UserError

FORMAT = "capsexp-checkpoint-1"


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write ``state`` to ``path`` so that a kill at any moment leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format": FORMAT, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_checkpoint(source: Path, path: Path) -> None:
    """Make ``path`` the same checkpoint as ``source`` (``best.pt`` when it equals ``last.pt``).

    A hard link costs no second write of a few hundred MB; the later replacement of ``source``
    by ``save_checkpoint`` gives ``source`` a new file and leaves ``path`` as it was. Falls back
    to a copy where the file system has no hard links. Atomic like ``save_checkpoint``.
    """
    tmp = path.with_name(f".{path.name}.link.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copyfile(source, tmp)
    os.replace(tmp, path)


def read_torch_file(path: str | Path, key: str, missing: str, unreadable: str) -> Any:
    """``torch.load`` on the CPU, tensors and plain containers only (no code runs from the file).

    A missing or unreadable file is one sentence: ``<key>: <missing>`` or ``<key>: <unreadable>``,
    where ``{path}`` and ``{error}`` are filled in.
    """
    if not Path(path).is_file():
        raise UserError(f"{key}: " + missing.format(path=path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{key}: " + unreadable.format(path=path, error=type(exc).__name__)) from None


def load_checkpoint(path: str | Path, key: str = "trainer.resume") -> dict[str, Any]:
    """Read a capsexp checkpoint; anything else (missing, truncated, foreign) is one clear sentence."""
    state = read_torch_file(path, key, "no checkpoint at '{path}'.",
                            "'{path}' is not a readable checkpoint (truncated or corrupt: {error}); "
                            "resume from another file, e.g. checkpoints/best.pt where the run kept one.")
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise UserError(f"{key}: '{path}' is not a capsexp checkpoint.")
    return state


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written checkpoint in a run folder (for ``trainer.resume=auto``)."""
    # best.pt may be a hard link to last.pt (same mtime): on a tie, last.pt
    found = sorted((run_dir / "checkpoints").glob("*.pt"), key=lambda p: (p.stat().st_mtime, p.name == "last.pt"))
    return found[-1] if found else None
