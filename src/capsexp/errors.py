"""Errors meant for the user: one clear sentence, printed without a traceback."""


class UserError(Exception):
    """Bad input or an unusable environment; the message names the key and what is allowed."""
