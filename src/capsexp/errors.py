"""Errors meant for the user: one clear sentence, printed without a traceback."""

import errno
import sys


class UserError(Exception):
    """Bad input or an unusable environment; the message names the key and what is allowed."""


def say_error(message: object) -> None:
    """The one line a user reads on stderr when capsexp stops: ``capsexp: error: <sentence>``."""
    print(f"capsexp: error: {message}", file=sys.stderr, flush=True)


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The UserError behind ``exc``: OmegaConf wraps what a resolver raises (twice) as the context."""
    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__ or exc.__context__
    return exc


# what the operating system says, in the words a user reads, for the errors a full, read-only or
# protected disk gives; anything else is a bug or a hardware fault and keeps its traceback
DISK_ERRNOS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}


def disk_cause(exc: BaseException | None) -> str | None:
    """The disk problem behind ``exc`` (an ``OSError`` anywhere in its chain), or None.

    torch.save reports a failed write as ``RuntimeError: [enforce fail at inline_container.cc]
    unexpected pos``, with the real ``OSError`` only as its context; so the chain is searched.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS:
            return DISK_ERRNOS[exc.errno]
        exc = exc.__cause__ or exc.__context__
    return None


def disk_error(path: object, exc: BaseException, kept: str = "") -> UserError | None:
    """One sentence for a write to ``path`` that the disk refused, or None when it was not the disk.

    ``kept`` says what is still intact (e.g. "the previous checkpoint is intact").
    """
    cause = disk_cause(exc)
    if cause is None:
        return None
    after = f"; {kept}" if kept else ""
    return UserError(f"could not write '{path}': {cause}{after}.")
