"""The vocabulary of config checks: ``(key, ok, allowed)`` triples that modules declare.

Each module that reads a config group declares, next to its ``build_*``:

* ``CHECKS``: checks of its keys that hold whatever option is chosen;
* ``OPTION_CHECKS``: ``{option name: checks}`` for the keys only one option has;
* optionally ``cross_check(cfg)``, for rules that relate several keys.

``capsexp.config.validation.validate`` collects them, so the command line and ``train(cfg)`` give the same
one-sentence errors, and a new option touches its module and its YAML file only.
"""

from __future__ import annotations

from typing import Any, Callable

Check = tuple[str, Callable[[Any], bool], str]  # (dotted key, predicate, what is allowed)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def integer(lo: int | None = None, hi: int | None = None, optional: bool = False) -> Callable[[Any], bool]:
    """An int (not a bool) in ``[lo, hi]``; ``None`` only when ``optional``."""
    def ok(v: Any) -> bool:
        if v is None:
            return optional
        if isinstance(v, bool) or not isinstance(v, int):
            return False
        return (lo is None or v >= lo) and (hi is None or v <= hi)
    return ok


def positive(optional: bool = False) -> Callable[[Any], bool]:
    """A number > 0; ``None`` only when ``optional``."""
    return lambda v: optional if v is None else _number(v) and v > 0


def nonneg(v: Any) -> bool:
    """A number >= 0."""
    return _number(v) and v >= 0


def below_one(v: Any) -> bool:
    """A number in [0, 1)."""
    return nonneg(v) and v < 1


def unit(v: Any) -> bool:
    """A number in [0, 1]."""
    return nonneg(v) and v <= 1


def choice(*options: Any) -> Callable[[Any], bool]:
    return lambda v: v in options


def boolean(v: Any) -> bool:
    return isinstance(v, bool)


def one_of(options: Any) -> str:
    """``"a, b or c"``: the allowed-phrase of a choice."""
    names = [str(o).lower() if isinstance(o, bool) else str(o) for o in options]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"
