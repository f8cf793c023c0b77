"""How capsexp writes a file: whole or not at all, and never through a link.

Every file capsexp writes (run records, metrics, reports, bench tables, figures) goes to a new
temporary file in the same folder and is renamed into place, so a reader, a full disk or a kill
never leaves half a file, and the old one survives a failed write. A symbolic link found at the
name is refused: following it would overwrite whatever it points to.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from capsexp.errors import UserError


def refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise UserError(f"'{path}' is a symbolic link; capsexp never writes through a link. Remove the link, or "
                        f"write to another folder.")


def write_atomic(path: Path, data: str | bytes) -> None:
    """``path`` holds ``data`` (text as UTF-8), replaced in one rename; raises OSError on a disk error."""
    refuse_link(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")  # O_EXCL: no planted file
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a written file gets the usual mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
