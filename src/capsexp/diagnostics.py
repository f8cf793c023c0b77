"""Gradient diagnostics during training: measures with ``capsexp.gradients``, writes TensorBoard.

Tags (a public interface, read by ``capsexp report``): ``grad_norm/<stage>``, ``grad_norm/total``,
``grad_to_weight/<stage>``, ``grad_rel_head/<stage>``, ``grad_norm_layer/<layer>``,
``grad_hist/<stage>``, the image ``grad_flow`` and the text ``alarm/vanishing_gradients``.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import Tensor

from capsexp.checks import Check, boolean, integer, positive
from capsexp.gradients import GradStats, VanishingAlarm, frozen_stages, gradient_stats, median_over_run
from capsexp.models import STAGES, Classifier

FLOW_LINES = 8  # logging steps drawn in one gradient-flow figure
ALARM_STAGES = STAGES[:-1]  # the head is the reference the early stages are compared with


def _stage_list(v: Any) -> bool:
    return (OmegaConf.is_list(v) or isinstance(v, (list, tuple))) and len(v) > 0 \
        and all(s in ALARM_STAGES for s in v)


CHECKS: list[Check] = [
    ("grads.enabled", boolean, "true or false"),
    ("grads.per_layer", boolean, "true or false"),
    ("grads.log_every_n_steps", integer(1), "a positive integer"),
    ("grads.histogram_every_n_steps", integer(0), "an integer >= 0 (0 = off)"),
    ("grads.figure_every_n_steps", integer(0), "an integer >= 0 (0 = off)"),
    ("grads.alarm.ratio", positive(), "a positive number"),
    ("grads.alarm.patience", integer(1), "a positive integer"),
    ("grads.alarm.early_stages", _stage_list,
     f"a non-empty list drawn from {', '.join(ALARM_STAGES)}, e.g. [stem,layer1]"),
]


class GradientMonitor:
    """Called once per step after backward (and unscaling); does work only at its intervals."""

    def __init__(self, grads_cfg: Any, telemetry_every: int, logger: Any, model: Classifier,
                 optimizer: torch.optim.Optimizer) -> None:
        self.cfg = grads_cfg
        self.telemetry_every = telemetry_every
        self.logger = logger
        self.stages = model.stages()
        self.head = model.head
        stages = self.stages
        self.alarm = VanishingAlarm(list(grads_cfg.alarm.early_stages), float(grads_cfg.alarm.ratio),
                                    int(grads_cfg.alarm.patience))
        self.history: list[dict[str, float]] = []
        self.flow: list[tuple[int, dict[str, float]]] = []
        self.alarm_message: str | None = None
        self.frozen = frozen_stages(stages)

    def _due(self, step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def _flow_needs(self, step: int) -> bool:
        """Whether this logging step is among the last ``FLOW_LINES`` before the next flow figure."""
        every = int(self.cfg.figure_every_n_steps)
        if every <= 0:
            return False
        next_figure = -(-step // every) * every
        return next_figure - step < FLOW_LINES * int(self.cfg.log_every_n_steps)

    def before_forward(self, step: int) -> None:
        """Nothing yet: the features-gradient hook goes here on logging steps."""

    def after_backward(self, step: int, grad_norms: dict[int, Tensor], total_norm: Tensor,
                       telemetry: dict[str, Tensor], visuals: dict[str, Tensor]) -> None:
        """``grad_norms``: per-parameter gradient norms and ``total_norm`` their total (the clipping
        norm), both computed by the step; ``telemetry`` and ``visuals``: what the head returned."""
        if self.cfg.enabled and self._due(step, int(self.cfg.log_every_n_steps)):
            stats = gradient_stats(self.stages, per_layer=bool(self.cfg.per_layer), mean_abs=self._flow_needs(step),
                                   grad_norms=grad_norms, total_norm=total_norm)
            self._log_stats(step, stats)
        if self._due(step, int(self.cfg.histogram_every_n_steps)):
            for name, module in self.stages.items():
                grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
                if grads:
                    self.logger.histogram(f"grad_hist/{name}", torch.cat(grads), step)
        if self._due(step, int(self.cfg.figure_every_n_steps)):
            self._log_figures(step, visuals)
        if telemetry and self._due(step, self.telemetry_every):
            values = torch.stack([v.float() for v in telemetry.values()]).tolist()  # one sync
            self.logger.scalars(dict(zip(telemetry, values)), step)

    def after_update(self, step: int, updated: bool) -> None:
        """Nothing yet: the update/weight ratios go here on logging steps."""

    def _log_stats(self, step: int, stats: GradStats) -> None:
        values: dict[str, float] = {"grad_norm/total": stats.total}
        head = stats.stage_norm.get("head")
        for stage, norm in stats.stage_norm.items():
            values[f"grad_norm/{stage}"] = norm
            values[f"grad_to_weight/{stage}"] = stats.stage_ratio[stage]
            if head:
                values[f"grad_rel_head/{stage}"] = norm / head
        for layer, norm in stats.layer_norm.items():
            values[f"grad_norm_layer/{layer}"] = norm
        self.logger.submit(lambda: self.logger.scalars(values, step), f"gradient norms at step {step}")
        if stats.nonfinite:  # an fp16 overflow step (skipped) or a failing one: not in the run's medians
            return
        self.history.append({f"grad_norm/{k}": v for k, v in stats.stage_norm.items()} |
                            {"grad_norm/total": stats.total})
        if stats.layer_mean_abs:
            self.flow = (self.flow + [(step, stats.layer_mean_abs)])[-FLOW_LINES:]
        event = self.alarm.update(stats, step)
        if event is not None:
            self.alarm_message = event.message
            print(f"capsexp: WARNING {event.message}", file=sys.stderr, flush=True)
            self.logger.text("alarm/vanishing_gradients", event.message, step)

    def _log_figures(self, step: int, visuals: dict[str, Tensor]) -> None:
        if self.flow and self.logger.writer is not None:
            from capsexp.figures import gradient_flow_figure

            flow = list(self.flow)  # host values: drawn on the logger's thread while training goes on
            self.logger.submit(lambda: self.logger.image(
                "grad_flow", gradient_flow_figure(flow, f"gradient flow up to step {step}"), step,
                dataformats="HWC"), f"the grad_flow figure at step {step}")
        for tag, grid in self.head.images(visuals).items():
            self.logger.image(tag, grid, step)

    def summary(self) -> dict[str, float]:
        """Median of every ``grad_norm/<stage>`` over the run: the numbers ``metrics.json`` keeps."""
        return median_over_run(self.history)

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history, "alarm_message": self.alarm_message,
                "alarm_fired": self.alarm.fired}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))
        self.alarm_message = state.get("alarm_message")
        if state.get("alarm_fired"):
            self.alarm.mark_fired()
