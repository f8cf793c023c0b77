"""What a training step needs, built from the composed config: ``build_loop``.

``capsexp train`` and ``capsexp bench`` both build through here, so the benchmark times the real
step with the real diagnostics.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig
from torch import Tensor

from capsexp.diagnostics.monitor import GradientMonitor
from capsexp.diagnostics.probe import ProbeSet
from capsexp.engine.console import NoLines
from capsexp.engine.loop import Lines, Loop, Monitor, NullMonitor, StepConfig
from capsexp.models.objective import Objective
from capsexp.diagnostics.tensorboard import RunLogger
from capsexp.models.losses import build_loss
from capsexp.models.classifier import build_model, score_kind
from capsexp.engine.optim import build_optimizer, build_scheduler, param_groups
from capsexp.runtime import Runtime, SignalGuard, prepare_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loop(cfg: DictConfig, rt: Runtime, num_classes: int, total_steps: int, log_dir: Path | None,
               show_progress: bool, lines: Lines | None = None, probe: Tensor | None = None,
               probe_set: ProbeSet | None = None) -> Loop:
    """Model, loss, optimizer, schedule, scaler, logger and diagnostics (on the main rank).

    ``lines``: progress as log lines (none by default); ``probe``: the fixed images drift is
    measured on, ``probe_set``: the labelled images of the linear probes (none by default)."""
    model = build_model(cfg, num_classes)
    criterion = build_loss(cfg.loss, score_kind(cfg.head))
    objective = Objective(model, criterion)
    runnable, evaluator, objective = prepare_model(objective, rt, bool(cfg.trainer.compile))
    model = objective.model
    groups = param_groups(model, criterion, cfg.optim, pretrained=cfg.backbone.weights is not None)
    optimizer = build_optimizer(cfg.optim, groups)
    scheduler = build_scheduler(cfg.optim, optimizer, total_steps)
    logger = RunLogger(log_dir if rt.is_main else None)
    monitor: Monitor = GradientMonitor(cfg.grads, logger, model, total_steps,
                                       probe if probe is not None else torch.empty(0), probe_set, num_classes) \
        if rt.is_main else NullMonitor()
    return Loop(objective=runnable, model=model, evaluator=evaluator, criterion=criterion, optimizer=optimizer,
                scheduler=scheduler, scaler=rt.grad_scaler(), rt=rt, config=StepConfig.from_config(cfg.trainer),
                logger=logger, monitor=monitor, guard=SignalGuard(), total_steps=total_steps,
                show_progress=show_progress, lines=lines if lines is not None else NoLines())
