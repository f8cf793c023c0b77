"""What each stage learns, measured during training and written to TensorBoard.

Tags (a public interface, read by ``capsexp report``): ``grad_norm/<stage>``, ``grad_norm/total``,
``grad_log10/<stage>`` and ``update_log10/<stage>`` (the same in decades, for linear axes),
``grad_to_weight/<stage>``, ``grad_rel_head/<stage>`` (not for the head itself), ``grad_layer/<layer>``,
``update_to_weight/<stage>``, ``update_to_weight_layer/<layer>``, ``grad_norm/features``, the images
``grad_map/features``, ``grad_flow`` and ``stage_profile``, ``drift/<stage>`` (at validations),
``grad_hist/<stage>`` and the texts ``alarm/<condition>``.

The measures are pure functions (``capsexp.diagnostics.gradients``, ``capsexp.diagnostics.drift``, ``capsexp.diagnostics.alarms``);
this module decides when they run, and nothing is copied or measured between logging steps.
"""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from capsexp.diagnostics.alarms import Alarm, AlarmEvent, ExplosionAlarm, NotLearningAlarm, VanishingAlarm
from capsexp.checks import Check, boolean, integer, positive
from capsexp.diagnostics.drift import DriftProbe
from capsexp.diagnostics.probe import LinearProbe, ProbeSet
from capsexp.diagnostics.features import FeatureGradient
from capsexp.diagnostics.gradients import (GradStats, frozen_stages, gradient_stats, parameter_layout, snapshot,
                               trainable_stages, update_stats)
from capsexp.diagnostics.tensorboard import Logger
from capsexp.models.classifier import Classifier
from capsexp.models.heads import Measure
from capsexp.models.stages import STAGES
from capsexp.runtime import Runtime
from capsexp.diagnostics.summary import RunHistory

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
    ("grads.drift.probe_images", integer(0), "an integer >= 0 (0 = off)"),
    ("grads.probe.images", integer(0), "an integer >= 0 (0 = off)"),
    ("grads.probe.every_n_validations", integer(1), "a positive integer"),
    ("grads.alarm.ratio", positive(), "a positive number"),
    ("grads.alarm.update_ratio", positive(), "a positive number"),
    ("grads.alarm.max_update_ratio", positive(), "a positive number"),
    ("grads.alarm.grad_jump", positive(), "a positive number"),
    ("grads.alarm.patience", integer(1), "a positive integer"),
    ("grads.alarm.early_stages", _stage_list,
     f"a non-empty list drawn from {', '.join(ALARM_STAGES)}, e.g. [stem,layer1]"),
]


class GradientMonitor:
    """Called by the step before forward, after backward (and unscaling) and after the update."""

    def __init__(self, grads_cfg: DictConfig, logger: Logger, model: Classifier, total_steps: int,
                 probe: Tensor, probe_set: ProbeSet | None = None, num_classes: int = 0) -> None:
        """``probe``: the fixed images drift is measured on (empty: no drift); ``probe_set``: the
        labelled images the linear probes are fitted and scored on (none: no probes)."""
        self.cfg = grads_cfg
        self.every = int(grads_cfg.log_every_n_steps)
        self.total_steps = total_steps
        self.model = model
        self.logger = logger
        self.stages = model.stages()
        self.frozen = frozen_stages(self.stages)
        self.features = FeatureGradient(model.backbone)
        alarm = grads_cfg.alarm
        early, patience = list(alarm.early_stages), int(alarm.patience)
        self._vanishing = VanishingAlarm(early, float(alarm.ratio), patience)
        self._not_learning = NotLearningAlarm(early, float(alarm.update_ratio), patience)
        self._exploding = ExplosionAlarm(float(alarm.max_update_ratio), float(alarm.grad_jump))
        self.alarms: dict[str, Alarm] = {"vanishing_gradients": self._vanishing,
                                         "not_learning": self._not_learning,
                                         "exploding": self._exploding}
        self.alarm_messages: dict[str, str] = {}
        self.history = RunHistory()
        self.flow: list[tuple[int, dict[str, float]]] = []
        self.drift = DriftProbe(probe, {name: self.stages[name] for name in trainable_stages(self.stages)})
        # the trainable backbone stages: a frozen stage writes nothing at all, as everywhere
        backbone = [s for s in trainable_stages(self.stages) if s in model.backbone.stages()]
        self.probe = LinearProbe(probe_set if probe_set is not None else ProbeSet.empty(),
                                 {s: self.stages[s] for s in backbone}, num_classes)
        self.probe_every = int(grads_cfg.probe.every_n_validations)
        self.validations = 0       # validations so far (the probe's interval counts them)
        self.probed_start = False  # probe/<stage> at step 0 written (a resumed run does not repeat it)
        self._before: tuple[Tensor, ...] | None = None  # weights before this logging step's update
        self._hops: list[str] = []              # this logging step's ladder, scores to features
        self._ladder: dict[str, Tensor] = {}    # |dL/d hop| over the batch, filled during backward
        self._loss_scale = 1.0                  # fp16 loss scaling multiplies every hop's gradient

    def _due(self, step: int, every: int) -> bool:
        return every > 0 and step % every == 0

    def _logging(self, step: int) -> bool:
        return bool(self.cfg.enabled) and self._due(step, self.every)

    def _flow_needs(self, step: int) -> bool:
        """Whether this logging step is among the last ``FLOW_LINES`` before the next flow figure
        (the figure steps, and the run's last step: a final figure is always drawn)."""
        every = int(self.cfg.figure_every_n_steps)
        if every <= 0:
            return False
        next_figure = min(-(-step // every) * every, self.total_steps)
        return next_figure - step < FLOW_LINES * self.every

    def before_forward(self, step: int) -> Measure:
        """On logging steps only: a hook that keeps dL/dF of the backbone's output (removed once read).
        Returns what the head should compute for this step: telemetry on logging steps, images on
        figure steps."""
        logging = self._logging(step)
        if logging:
            self.features.arm()
        return Measure(telemetry=logging, images=self._due(step, int(self.cfg.figure_every_n_steps)))

    def after_backward(self, step: int, grad_norms: dict[int, Tensor], total_norm: Tensor,
                       telemetry: dict[str, Tensor], images: dict[str, Tensor]) -> None:
        """``grad_norms``: per-parameter gradient norms and ``total_norm`` their total (the clipping
        norm), both computed by the step; ``telemetry`` and ``images``: what the head returned for
        the ``Measure`` that ``before_forward`` asked for."""
        if self._logging(step):
            stats = gradient_stats(self.stages, per_layer=bool(self.cfg.per_layer), mean_abs=self._flow_needs(step),
                                   grad_norms=grad_norms, total_norm=total_norm)
            self._log_stats(step, stats)
            self._before = snapshot([p for params in parameter_layout(self.stages)[0].values() for p in params])
        if self._due(step, int(self.cfg.histogram_every_n_steps)):
            for name, module in self.stages.items():
                grads = [p.grad.flatten() for p in module.parameters() if p.grad is not None]
                if grads:
                    self.logger.histogram(f"grad_hist/{name}", torch.cat(grads), step)
        if self._due(step, int(self.cfg.figure_every_n_steps)):
            self._log_figures(step)
            for tag, grid in images.items():
                self.logger.image(tag, grid, step)
        if telemetry:
            # float64 on the host: routing/entropy_deficit is 1e-6 of log J at this geometry
            values = torch.stack([v.double() for v in telemetry.values()]).tolist()  # one sync
            self.logger.scalars(dict(zip(telemetry, values)), step)
            self.history.add(step, {k: v for k, v in zip(telemetry, values) if k.startswith("routing/")})

    def watch(self, hops: dict[str, Tensor], scaler: torch.amp.GradScaler) -> None:
        """Tensor hooks on the ladder's activations (what the head returned for a logging step; none
        otherwise): each keeps the norm of its gradient over the whole batch, on the device. The
        features' own hop is the features gradient the monitor already keeps."""
        self._ladder, self._hops = {}, list(hops)
        if not hops:
            return
        self._loss_scale = float(scaler.get_scale()) if scaler.is_enabled() else 1.0
        for name, tensor in hops.items():
            if name != "features" and tensor.requires_grad:
                tensor.register_hook(functools.partial(self._keep_hop, name))

    def _keep_hop(self, name: str, grad: Tensor | None) -> None:
        # None: under trainer.compile a hop inside the compiled graph gets its gradient there, and
        # its returned copy none from outside; the ladder then leaves that hop out
        if grad is not None:
            self._ladder[name] = torch.linalg.vector_norm(grad.detach().float())

    def after_update(self, step: int, updated: bool) -> None:
        """On logging steps: update/weight per stage, the features gradient and the gradient ladder,
        in one host transfer. A skipped update writes nothing."""
        before, self._before = self._before, None
        captured = self.features.take()
        hops = [h for h in self._hops if h in self._ladder]
        ladder = [self._ladder[h] for h in hops]
        self._ladder = {}
        if before is None or not updated:
            return
        extra = [captured.norm, captured.position_map.flatten()] if captured is not None else []
        stats = update_stats(self.stages, before, per_layer=bool(self.cfg.per_layer), extra=[*ladder, *extra])
        ladder_values, extra_values = stats.extra[:len(hops)], stats.extra[len(hops):]
        values = {f"update_to_weight/{k}": v for k, v in stats.stage_ratio.items()}
        values |= {f"update_log10/{k}": math.log10(v) for k, v in stats.stage_ratio.items() if v > 0 and math.isfinite(v)}
        values |= {f"update_to_weight_layer/{k}": v for k, v in stats.layer_ratio.items()}
        if captured is not None:
            values["grad_norm/features"] = extra_values[0]
            # host values already (the one transfer above): the figure reads no tensor
            position_map = np.asarray(extra_values[1:]).reshape(tuple(captured.position_map.shape))
            self.logger.submit(lambda: self.logger.image("grad_map/features", _map_image(position_map), step,
                                                         dataformats="HWC"), f"grad_map/features at step {step}")
        if captured is not None and "features" in self._hops:
            hops, ladder_values = [*hops, "features"], [*ladder_values, extra_values[0]]
        values |= ladder_scalars(hops, [v / self._loss_scale for v in ladder_values])
        self.logger.submit(lambda: self.logger.scalars(values, step), f"update ratios at step {step}")
        self.history.add(step, {k: v for k, v in values.items()
                                if k.startswith(("update_to_weight/", "grad_ladder/")) or k == "grad_norm/features"})
        self._fire(self._not_learning.update(stats.stage_ratio, step), "not_learning")
        self._fire(self._exploding.update_updates(stats.stage_ratio, step), "exploding")

    def _log_stats(self, step: int, stats: GradStats) -> None:
        values: dict[str, float] = {"grad_norm/total": stats.total}
        head = stats.stage_norm.get("head")
        for stage, norm in stats.stage_norm.items():
            values[f"grad_norm/{stage}"] = norm
            if norm > 0 and math.isfinite(norm):
                values[f"grad_log10/{stage}"] = math.log10(norm)
            values[f"grad_to_weight/{stage}"] = stats.stage_ratio[stage]
            if head and stage != "head":
                values[f"grad_rel_head/{stage}"] = norm / head
        for layer, norm in stats.layer_norm.items():
            values[f"grad_layer/{layer}"] = norm
        self.logger.submit(lambda: self.logger.scalars(values, step), f"gradient norms at step {step}")
        if stats.nonfinite:  # an fp16 overflow step (skipped) or a failing one: not in the run's statistics
            return
        self.history.add(step, {f"grad_norm/{k}": v for k, v in stats.stage_norm.items()} |
                         {"grad_norm/total": stats.total})
        if stats.layer_mean_abs:
            self.flow = (self.flow + [(step, stats.layer_mean_abs)])[-FLOW_LINES:]
        self._fire(self._vanishing.update(stats, step), "vanishing_gradients")
        self._fire(self._exploding.update_grads(stats.stage_norm, step), "exploding")

    def _fire(self, event: AlarmEvent | None, condition: str) -> None:
        if event is None:
            return
        self.alarm_messages[condition] = event.message
        print(f"capsexp: WARNING {event.message}", file=sys.stderr, flush=True)
        self.logger.text(f"alarm/{condition}", event.message, event.step)

    def _log_figures(self, step: int) -> None:
        """``grad_flow`` (the last logging steps, layer by layer) and ``stage_profile`` (every logging
        step so far, stage by stage), drawn from host values on the logger's thread."""
        from capsexp.diagnostics.figures import gradient_flow_figure, stage_profile_figure

        flow, profile = list(self.flow), self.history.series("grad_norm/", STAGES)
        if flow:
            title = f"gradient flow, steps {flow[0][0]}-{flow[-1][0]} ({len(flow)} logging steps)"
            self.logger.submit(lambda: self.logger.image("grad_flow", gradient_flow_figure(flow, title), step,
                                                         dataformats="HWC"), f"the grad_flow figure at step {step}")
        if profile:
            self.logger.submit(lambda: self.logger.image("stage_profile", stage_profile_figure(profile), step,
                                                         dataformats="HWC"), f"the stage_profile figure at step {step}")

    def start(self, rt: Runtime) -> None:
        """The starting Gram matrices of the drift probe (kept when a checkpoint brought them), and
        the linear probes at step 0, so that their change is visible."""
        if len(self.drift.images) and not self.drift.reference:
            self.drift.start(self.model, rt)
        if self.probe.enabled and not self.probed_start:
            self._probe(0, rt)
            self.probed_start = True

    def _probe(self, step: int, rt: Runtime) -> dict[str, float]:
        values = self.probe.measure(self.model, rt)
        if values:
            self.logger.scalars(values, step)
            self.history.last_probe = values
        return values

    def on_validation(self, step: int, rt: Runtime) -> dict[str, float]:
        """``drift/<stage>`` after a validation; returns the values logged."""
        values = self.drift.measure(self.model, rt)
        if values:
            self.logger.scalars(values, step)
            self.history.last_drift = values
        self.validations += 1
        if self.probe.enabled and self.probe_every > 0 and self.validations % self.probe_every == 0:
            values = values | self._probe(step, rt)
        return values

    def finish(self, step: int) -> None:
        """The final figures, whatever the interval (a run shorter than it gets one too), and the
        gradient ladder of the run: every logging step's, scores to features."""
        if int(self.cfg.figure_every_n_steps) > 0 and not self._due(step, int(self.cfg.figure_every_n_steps)):
            self._log_figures(step)
        ladder = self.history.series("grad_ladder/", tuple(self._hops))
        if ladder:
            from capsexp.diagnostics.figures import stage_profile_figure

            title = "gradient ladder |dL/d hop|, scores to features (log scale)"
            self.logger.submit(lambda: self.logger.image("grad_ladder", stage_profile_figure(ladder, title), step,
                                                         dataformats="HWC"), f"the grad_ladder figure at step {step}")

    def summary(self) -> dict[str, float]:
        """What ``metrics.json`` keeps: medians and maxima per stage over the run, the last drift."""
        return self.history.summary(list(self.cfg.alarm.early_stages))

    @property
    def alarm_message(self) -> str | None:
        """The vanishing-gradient alarm's message (``metrics.json``'s ``alarm/vanishing_gradients``)."""
        return self.alarm_messages.get("vanishing_gradients")

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history.state_dict(), "alarm_messages": self.alarm_messages,
                "alarms_fired": [k for k, a in self.alarms.items() if a.fired],
                "drift": self.drift.state_dict(), "validations": self.validations,
                "probed_start": self.probed_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history.load_state_dict(state.get("history", {}))
        self.alarm_messages = dict(state.get("alarm_messages", {}))
        for name in state.get("alarms_fired", []):
            self.alarms[name].fired = True
        self.drift.load_state_dict(state.get("drift", {}))
        self.validations = int(state.get("validations", 0))
        self.probed_start = bool(state.get("probed_start", False))


def ladder_scalars(hops: list[str], norms: list[float]) -> dict[str, float]:
    """``grad_ladder/<hop>``: |dL/d hop| over the batch, from the scores to the features, and
    ``grad_ladder_ratio/<hop>``: that over the previous hop's (below 1: the hop shrinks the gradient)."""
    values = {f"grad_ladder/{h}": n for h, n in zip(hops, norms)}
    for (_, before), (hop, now) in zip(zip(hops, norms), list(zip(hops, norms))[1:]):
        if before > 0:
            values[f"grad_ladder_ratio/{hop}"] = now / before
    return values


def _map_image(position_map: np.ndarray) -> np.ndarray:
    from capsexp.diagnostics.figures import position_map_figure

    return position_map_figure(position_map, "per-position |dL/dF|, batch mean")
