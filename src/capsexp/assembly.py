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

from capsexp.diagnostics import GradientMonitor
from capsexp.loop import Loop, StepConfig
from capsexp.objective import Objective
from capsexp.logger import RunLogger
from capsexp.losses import build_loss
from capsexp.models import build_model
from capsexp.optim import build_optimizer, build_scheduler, param_groups
from capsexp.runtime import Runtime, SignalGuard, prepare_model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loop(cfg: DictConfig, rt: Runtime, num_classes: int, total_steps: int, log_dir: Path | None,
               show_progress: bool) -> Loop:
    """Model, loss, optimizer, schedule, scaler, logger and diagnostics (on the main rank)."""
    model = build_model(cfg, num_classes)
    criterion = build_loss(cfg.loss)
    objective = Objective(model, criterion, float(cfg.loss.reconstruction_weight))
    runnable, evaluator, objective = prepare_model(objective, rt, bool(cfg.trainer.compile))
    model = objective.model
    groups = param_groups(model, criterion, cfg.optim, pretrained=cfg.backbone.weights is not None)
    optimizer = build_optimizer(cfg.optim, groups)
    scheduler = build_scheduler(cfg.optim, optimizer, total_steps)
    logger = RunLogger(log_dir if rt.is_main else None)
    monitor = GradientMonitor(cfg.grads, int(cfg.trainer.log_every_n_steps), logger, model, total_steps) \
        if rt.is_main else None
    return Loop(objective=runnable, model=model, evaluator=evaluator, criterion=criterion, optimizer=optimizer,
                scheduler=scheduler, scaler=rt.grad_scaler(), rt=rt, config=StepConfig.from_config(cfg.trainer),
                logger=logger, monitor=monitor, guard=SignalGuard(), total_steps=total_steps,
                show_progress=show_progress)
