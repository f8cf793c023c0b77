"""Alarms on the per-stage learning measures: each names its condition, stage and step, and fires once.

* ``vanishing_gradients``: the early stages' gradient norm stays below a fraction of the head's;
* ``not_learning``: the early stages' update/weight ratio stays below a fraction of the head's
  (judged on the real step, so Adam's normalisation cannot hide it, or fake it);
* ``exploding``: one step changes a stage by more than a bound of its own norm, or a stage's
  gradient norm jumps by a factor over its median so far (a collapse medians would hide).

Pure state machines over host values: no tensors, no logging.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Protocol

from capsexp.diagnostics.gradients import GradStats


class Alarm(Protocol):
    """What every alarm shares: it fires once, and a resumed run can mark it as fired."""

    fired: bool


@dataclass(frozen=True)
class AlarmEvent:
    """The moment the early stages' gradients were judged to have vanished."""

    step: int
    stage: str
    ratio: float
    threshold: float
    message: str


class VanishingAlarm:
    """Fires once when the early stages' gradients stay tiny relative to the head's.

    The early-stage norm is the combined norm of those ``early_stages`` that are
    trainable (present in the stats). If none of them is trainable, or the
    reference stage is absent, the alarm is inert. An update counts as
    "vanishing" when ``early_norm < ratio * reference_norm``; ``patience``
    consecutive vanishing updates fire the alarm, a healthy update resets the
    count, and after firing the alarm stays silent for good.
    """

    def __init__(
        self, early_stages: list[str], ratio: float, patience: int, reference: str = "head"
    ) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1, got {patience}")
        self.early_stages = list(early_stages)
        self.ratio = float(ratio)
        self.patience = int(patience)
        self.reference = reference
        self._streak = 0
        self.fired = False

    def mark_fired(self) -> None:
        """Silence the alarm for good, e.g. when resuming a run where it already fired."""
        self.fired = True

    def update(self, stats: GradStats, step: int) -> AlarmEvent | None:
        """Feed one logging step's stats; return an event the one time it fires."""
        if self.fired:
            return None
        early = [s for s in self.early_stages if s in stats.stage_norm]
        reference = stats.stage_norm.get(self.reference)
        if not early or reference is None:
            return None
        early_norm = math.sqrt(sum(stats.stage_norm[s] ** 2 for s in early))
        # Non-finite steps are a different failure and an all-zero reference
        # (e.g. before any backward pass) carries no information: neither
        # counts towards nor resets the streak.
        if stats.nonfinite or not math.isfinite(early_norm) or not reference > 0.0:
            return None
        observed = early_norm / reference
        if observed >= self.ratio:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self.patience:
            return None
        self.fired = True
        stage = "+".join(early)
        message = (
            f"vanishing gradients: grad_norm/{stage} has stayed below "
            f"{self.ratio * 100:g}% of grad_norm/{self.reference} for "
            f"{self.patience} logging steps (ratio {observed:.2g} at step {step})"
        )
        return AlarmEvent(
            step=step, stage=stage, ratio=observed, threshold=self.ratio, message=message
        )


class NotLearningAlarm:
    """Fires once when the early stages' update/weight stays below ``ratio`` x the head's for
    ``patience`` consecutive logging steps (combined like the vanishing alarm: root sum of squares)."""

    def __init__(self, early_stages: list[str], ratio: float, patience: int, reference: str = "head") -> None:
        self.early_stages, self.ratio, self.patience, self.reference = list(early_stages), ratio, patience, reference
        self._streak = 0
        self.fired = False

    def update(self, stage_ratio: dict[str, float], step: int) -> AlarmEvent | None:
        early = [s for s in self.early_stages if s in stage_ratio]
        reference = stage_ratio.get(self.reference)
        if self.fired or not early or reference is None or not reference > 0:
            return None
        observed = math.sqrt(sum(stage_ratio[s] ** 2 for s in early)) / reference
        if not math.isfinite(observed) or observed >= self.ratio:
            self._streak = 0
            return None
        self._streak += 1
        if self._streak < self.patience:
            return None
        self.fired = True
        stage = "+".join(early)
        return AlarmEvent(step, stage, observed, self.ratio, (
            f"early stages not learning: update_to_weight/{stage} has stayed below {self.ratio * 100:g}% of "
            f"update_to_weight/{self.reference} for {self.patience} logging steps (ratio {observed:.2g} at step {step})"))


class ExplosionAlarm:
    """Fires once when a step moves a stage by more than ``max_update`` of its norm, or a stage's
    gradient norm exceeds ``jump`` x its median over the earlier logging steps (three at least)."""

    def __init__(self, max_update: float, jump: float) -> None:
        self.max_update, self.jump = max_update, jump
        self._norms: dict[str, list[float]] = {}
        self.fired = False

    def update_grads(self, stage_norm: dict[str, float], step: int) -> AlarmEvent | None:
        event = None
        for stage, norm in stage_norm.items():
            past = self._norms.setdefault(stage, [])
            if event is None and not self.fired and len(past) >= 3 and math.isfinite(norm):
                median = statistics.median(past)
                if median > 0 and norm > self.jump * median:
                    event = self._fire(step, stage, norm / median, self.jump, (
                        f"exploding: grad_norm/{stage} jumped to {norm:.3g}, {norm / median:.3g}x its median "
                        f"{median:.3g} so far (bound grads.alarm.grad_jump={self.jump:g}) at step {step}"))
            if math.isfinite(norm):
                past.append(norm)
        return event

    def update_updates(self, stage_ratio: dict[str, float], step: int) -> AlarmEvent | None:
        for stage, ratio in stage_ratio.items():
            if not self.fired and (ratio > self.max_update or not math.isfinite(ratio)):
                return self._fire(step, stage, ratio, self.max_update, (
                    f"exploding: update_to_weight/{stage} = {ratio:.3g} at step {step}: one step moved the stage "
                    f"by more than grads.alarm.max_update_ratio={self.max_update:g} of its weights"))
        return None

    def _fire(self, step: int, stage: str, ratio: float, threshold: float, message: str) -> AlarmEvent:
        self.fired = True
        return AlarmEvent(step, stage, ratio, threshold, message)
