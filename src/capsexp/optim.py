"""Optimizer and learning-rate schedule from the ``optim`` config group."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LinearLR, LRScheduler, SequentialLR

from capsexp.errors import UserError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "constant")


def backbone_lr_scale(cfg: Any, pretrained: bool) -> float:
    """``auto``: 0.1 for a pretrained backbone (the usual fine-tuning ratio), 1.0 for a random one."""
    if cfg.backbone_lr_scale == "auto":
        return 0.1 if pretrained else 1.0
    return float(cfg.backbone_lr_scale)


def param_groups(model: nn.Module, extra: nn.Module, cfg: Any, pretrained: bool) -> list[dict[str, Any]]:
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
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=float(cfg.lr), momentum=float(cfg.momentum),
                               nesterov=bool(cfg.nesterov) and float(cfg.momentum) > 0)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=float(cfg.lr), betas=tuple(cfg.betas))
    raise UserError(f"optim must be one of {', '.join(OPTIMIZERS)}; got '{cfg.name}'.")


def build_scheduler(cfg: Any, optimizer: torch.optim.Optimizer, total_steps: int) -> LRScheduler:
    """Linear warm-up, then cosine decay to ``lr x min_lr_ratio`` at ``total_steps`` (or constant)."""
    warmup = min(int(cfg.warmup_steps), max(total_steps - 1, 0))
    if cfg.scheduler == "constant":
        main: LRScheduler = LambdaLR(optimizer, lambda _: 1.0)
    elif cfg.scheduler == "cosine":
        main = _cosine(optimizer, max(total_steps - warmup, 1), float(cfg.min_lr_ratio))
    else:
        raise UserError(f"optim.scheduler must be one of {', '.join(SCHEDULERS)}; got '{cfg.scheduler}'.")
    if warmup == 0:
        return main
    ramp = LinearLR(optimizer, start_factor=1.0 / (warmup + 1), total_iters=warmup)
    return SequentialLR(optimizer, [ramp, main], milestones=[warmup])


def _cosine(optimizer: torch.optim.Optimizer, steps: int, floor: float) -> LRScheduler:
    # CosineAnnealingLR has one absolute eta_min for all groups; a factor keeps every group's
    # minimum at the same fraction of its own lr, so the backbone/head ratio holds throughout
    def factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps))

    return LambdaLR(optimizer, factor)
