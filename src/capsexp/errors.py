"""Errors meant for the user: one clear sentence, printed without a traceback."""


class UserError(Exception):
    """Bad input or an unusable environment; the message names the key and what is allowed."""


def user_error_in(exc: BaseException | None) -> UserError | None:
    """The UserError behind ``exc``: OmegaConf wraps what a resolver raises (twice) as the context."""
    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__ or exc.__context__
    return exc
