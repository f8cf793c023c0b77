"""Accuracy against chance, for ``capsexp report``: the chance level of a run and whether its
accuracy can mean anything yet.

A run's best validation accuracy says nothing about its head while the run is short (fewer than
``MIN_STEPS`` steps) or while that accuracy is within ``STANDARD_ERRORS`` binomial standard
errors of chance, ``sqrt(p (1 - p) / n)`` for chance ``p = 1 / num_classes`` and ``n`` validation
images: a model that guesses lands there by luck.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

# runs whose metrics.json predates its num_classes entry, and runs still going: the data set's count
from capsexp.data.catalog import CLASS_COUNTS

MIN_STEPS = 50
STANDARD_ERRORS = 2.0


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def chance_level(metrics: Mapping[str, Any] | None, config: Mapping[str, Any]) -> float | None:
    """``1 / num_classes`` from metrics.json, else from the data set's name; None when unknown."""
    classes = _count((metrics or {}).get("num_classes")) or CLASS_COUNTS.get(str(config.get("data.name")))
    return 1.0 / classes if classes else None


def validation_images(metrics: Mapping[str, Any] | None, config: Mapping[str, Any]) -> int | None:
    """Images per evaluation: metrics.json's ``val_images``, else ``data.val_size`` (the shapes data)
    capped by ``trainer.limit_val_batches`` x ``data.batch_size``; None when unknown."""
    images = _count((metrics or {}).get("val_images"))
    if images is not None:
        return images
    size, limit, batch = (_count(config.get(k)) for k in ("data.val_size", "trainer.limit_val_batches",
                                                          "data.batch_size"))
    return min(size, limit * batch) if size and limit and batch else size


def too_short(steps: int | None, best_acc: float | None, chance: float | None, images: int | None) -> bool:
    """True when the accuracy cannot tell this run from guessing (see the module doc)."""
    if steps is not None and steps < MIN_STEPS:
        return True
    if best_acc is None or chance is None or not images:
        return False
    return best_acc <= chance + STANDARD_ERRORS * math.sqrt(chance * (1 - chance) / images)


def accuracy_meaningless(steps: int | None, best_acc: float | None, metrics: Mapping[str, Any] | None,
                         config: Mapping[str, Any]) -> bool:
    """``too_short`` with the chance level and validation size read from a run's files."""
    return too_short(steps, best_acc, chance_level(metrics, config), validation_images(metrics, config))


def short_note(labels: Sequence[str], flags: Sequence[bool]) -> str | None:
    """The report's one line about runs too short for their accuracy to mean anything, or None."""
    short = [label for label, flag in zip(labels, flags) if flag]
    if not short:
        return None
    which = "every run" if len(short) == len(labels) else ", ".join(short)
    return (f"note: too short for accuracy to mean anything: {which} (fewer than {MIN_STEPS} steps, or best "
            f"val/acc within {STANDARD_ERRORS:g} binomial standard errors of chance, the dashed line in "
            f"report.png); compare gradients, or train longer.")
