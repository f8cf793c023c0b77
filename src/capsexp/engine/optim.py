"""Optimizer and learning-rate schedule from the ``optim`` config group."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import torch
from omegaconf import OmegaConf
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LinearLR, LRScheduler, SequentialLR

from capsexp.checks import Check, boolean, choice, integer, nonneg, one_of, positive, unit

if TYPE_CHECKING:
    from capsexp.models.classifier import Classifier


def _sgd(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=float(cfg.lr), momentum=float(cfg.momentum),
                           nesterov=bool(cfg.nesterov) and float(cfg.momentum) > 0)


def _adamw(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=float(cfg.lr), betas=tuple(cfg.betas))


# the options of the ``optim`` group: name -> builder from (group config, parameter groups)
OPTIMIZERS: dict[str, Callable[[Any, list[dict[str, Any]]], torch.optim.Optimizer]] = {"sgd": _sgd, "adamw": _adamw}


def _betas(v: Any) -> bool:
    return OmegaConf.is_list(v) and len(v) == 2 and all(nonneg(b) and b < 1 for b in v)


OPTION_CHECKS: dict[str, list[Check]] = {
    "adamw": [("optim.betas", _betas, "a list of two numbers in [0, 1), e.g. [0.9,0.999]")],
    "sgd": [("optim.momentum", nonneg, "a number >= 0"), ("optim.nesterov", boolean, "true or false")],
}


def backbone_lr_scale(cfg: Any, pretrained: bool) -> float:
    """``auto``: 0.1 for a pretrained backbone (the usual fine-tuning ratio), 1.0 for a random one."""
    if cfg.backbone_lr_scale == "auto":
        return 0.1 if pretrained else 1.0
    return float(cfg.backbone_lr_scale)


def param_groups(model: Classifier, extra: nn.Module, cfg: Any, pretrained: bool) -> list[dict[str, Any]]:
    """Backbone at ``lr x backbone_lr_scale``, adapter + head (+ a learned loss scale) at ``lr``.

    Biases and normalisation weights (1-d tensors) get no weight decay, as usual in fine-tuning.
    """
    lr, wd = float(cfg.lr), float(cfg.weight_decay)
    groups: list[dict[str, Any]] = []
    parts = {"backbone": (list(model.backbone.parameters()), lr * backbone_lr_scale(cfg, pretrained)),
             "head": (list(model.adapter.parameters()) + list(model.head.parameters())
                      + list(extra.parameters()), lr)}
    for name, (params, group_lr) in parts.items():
        params = [p for p in params if p.requires_grad]
        decay = [p for p in params if p.ndim > 1]
        no_decay = [p for p in params if p.ndim <= 1]
        for suffix, chunk, weight_decay in (("", decay, wd), ("_no_decay", no_decay, 0.0)):
            if chunk:
                groups.append({"name": name + suffix, "params": chunk, "lr": group_lr,
                               "weight_decay": weight_decay})
    return groups


def build_optimizer(cfg: Any, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.name`` (the ``optim`` group, already validated)."""
    return OPTIMIZERS[cfg.name](cfg, groups)


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """Linear warm-up, then cosine decay to ``lr x min_lr_ratio`` at ``total_steps`` (or constant)."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    main = SCHEDULERS[cfg.scheduler](optimizer, max(total_steps - warmup, 1), float(cfg.min_lr_ratio))
    # the schedule's shape follows the config alone, never total_steps: a run extended on resume
    # (a larger trainer.max_steps) loads the same kind of state, even where a 1-step run had no room
    # for its warm-up (a ramp of 0 steps)
    if int(cfg.warmup_steps) == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _cosine(optimizer: torch.optim.Optimizer, steps: int, floor: float) -> LRScheduler:
    # CosineAnnealingLR has one absolute eta_min for all groups; a factor keeps every group's
    # minimum at the same fraction of its own lr, so the backbone/head ratio holds throughout
    def factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    return LambdaLR(optimizer, factor)


# ``optim.scheduler``: name -> schedule after warm-up from (optimizer, its steps, final lr fraction)
SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer, int, float], LRScheduler]] = {
    "cosine": _cosine,
    "constant": lambda optimizer, steps, floor: LambdaLR(optimizer, lambda _: 1.0),
}
CHECKS: list[Check] = [
    ("optim.lr", positive(), "a positive number"),
    ("optim.weight_decay", nonneg, "a number >= 0"),
    ("optim.backbone_lr_scale", lambda v: v == "auto" or nonneg(v), "auto or a number >= 0"),
    ("optim.warmup_steps", integer(0), "an integer >= 0"),
    ("optim.scheduler", choice(*SCHEDULERS), one_of(SCHEDULERS)),
    ("optim.min_lr_ratio", unit, "a number in [0, 1] (the final fraction of optim.lr)"),
]
