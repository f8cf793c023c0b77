"""How capsexp writes a file: whole or not at all, and never through a link; and how it reads the
YAML of a run or sweep folder (which is input too).

Every file capsexp writes (run records, metrics, reports, bench tables, figures) goes to a new
temporary file in the same folder and is renamed into place, so a reader, a full disk or a kill
never leaves half a file, and the old one survives a failed write. A symbolic link found at the
name is refused: following it would overwrite whatever it points to.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import yaml

from capsexp.errors import UserError


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when it is inside it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


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


class _NoAliases(yaml.SafeLoader):
    """capsexp writes no YAML aliases; refusing them keeps an alias bomb from filling the memory."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            raise yaml.YAMLError("YAML aliases are not read")
        return super().compose_node(parent, index)


def safe_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_NoAliases)  # noqa: S506 -- a SafeLoader, without aliases
