"""The learning-rate schedule, the parameter groups and ``optim.backbone_lr_scale``, against the
formulas the docs give (warm-up ramp, cosine to ``lr x min_lr_ratio``, backbone at ``lr x scale``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from capsexp.engine.optim import build_optimizer, build_scheduler, param_groups
from capsexp.models.classifier import build_model
from conftest import make_cfg


def expected_lr(step: int, lr: float, warmup: int, total: int, floor: float, scheduler: str) -> float:
    """The lr of step ``step`` (0-based), written from the formula: a linear ramp from lr/(warmup+1)
    over ``warmup`` steps, then cosine from lr to lr x floor over the remaining steps (or constant)."""
    if step < warmup:
        return lr * (1 / (warmup + 1) + (1 - 1 / (warmup + 1)) * step / warmup)
    if scheduler == "constant":
        return lr
    t = min(step - warmup, total - warmup)
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t / (total - warmup))))


def lrs(cfg_optim: object, total: int) -> list[float]:
    parameter = nn.Parameter(torch.zeros(2, 2))
    optimizer = build_optimizer(cfg_optim, [{"name": "p", "params": [parameter], "lr": float(cfg_optim.lr),
                                             "weight_decay": 0.0}])
    scheduler = build_scheduler(cfg_optim, optimizer, total)
    out = []
    for _ in range(total):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize("optim, scheduler, warmup", [("adamw", "cosine", 5), ("sgd", "cosine", 0),
                                                      ("adamw", "constant", 3)])
def test_the_schedule_is_a_linear_ramp_then_cosine_to_the_floor(optim: str, scheduler: str, warmup: int) -> None:
    cfg = make_cfg(f"optim={optim}", f"optim.scheduler={scheduler}", f"optim.warmup_steps={warmup}",
                   "optim.min_lr_ratio=0.05").optim
    total = 30
    got = lrs(cfg, total)
    want = [expected_lr(s, float(cfg.lr), warmup, total, 0.05, scheduler) for s in range(total)]
    assert got == pytest.approx(want, rel=1e-9)
    if scheduler == "cosine":
        # the last step sits just above the floor, and a planted missing floor would be caught
        assert got[-1] > 0.05 * float(cfg.lr) and got[-1] != pytest.approx(
            expected_lr(total - 1, float(cfg.lr), warmup, total, 0.0, scheduler), rel=1e-3)


@pytest.mark.parametrize("weights, scale, expected", [(None, "auto", 1.0), ("pretrained", "auto", 0.1),
                                                      (None, 0.25, 0.25)])
def test_the_backbone_learns_at_lr_times_its_scale_and_1d_tensors_skip_weight_decay(
        weights: str | None, scale: object, expected: float) -> None:
    cfg = make_cfg("head=capsule", "adapter=conv", f"optim.backbone_lr_scale={scale}")
    model = build_model(cfg, 8)
    groups = param_groups(model, nn.Identity(), cfg.optim, pretrained=weights is not None)
    lr, wd = float(cfg.optim.lr), float(cfg.optim.weight_decay)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    assert by_name["backbone"]["lr"] == by_name["backbone_no_decay"]["lr"] == pytest.approx(lr * expected)
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == lr
    assert by_name["backbone"]["weight_decay"] == by_name["head"]["weight_decay"] == wd
    assert by_name["backbone_no_decay"]["weight_decay"] == by_name["head_no_decay"]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for g in ("backbone", "head") for p in by_name[g]["params"])
    assert all(p.ndim <= 1 for g in ("backbone_no_decay", "head_no_decay") for p in by_name[g]["params"])
    # every trainable parameter in exactly one group, the backbone's in the backbone's
    grouped = [id(p) for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    backbone = {id(p) for p in model.backbone.parameters()}
    assert {id(p) for g in ("backbone", "backbone_no_decay") for p in by_name[g]["params"]} == backbone


def test_frozen_stages_are_in_no_group() -> None:
    cfg = make_cfg("backbone.freeze_depth=2")
    model = build_model(cfg, 8)
    grouped = {id(p) for g in param_groups(model, nn.Identity(), cfg.optim, pretrained=False) for p in g["params"]}
    assert not any(id(p) in grouped for name in ("stem", "layer1") for p in model.backbone.stages()[name].parameters())
    assert all(id(p) in grouped for p in model.backbone.stages()["layer2"].parameters())
