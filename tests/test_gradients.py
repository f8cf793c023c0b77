"""Tests for per-stage gradient statistics, the vanishing alarm and the flow figure."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from capsexp.diagnostics.figures import gradient_flow_figure
from capsexp.diagnostics.alarms import VanishingAlarm
from capsexp.diagnostics.gradients import (
    GradStats,
    frozen_stages,
    gradient_stats,
    median_over_run,
    nonfinite_stage,
    trainable_stages,
    weight_bearing_layers,
)

class ClassCaps(nn.Module):
    """Stand-in for a capsule layer: a raw transformation-matrix parameter."""

    def __init__(self, n_in: int, n_out: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bi,oid->bod", x, self.weight).norm(dim=-1)


class CapsHead(nn.Module):
    def __init__(self, channels: int, classes: int, proj_name: str = "proj") -> None:
        super().__init__()
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.proj_name = proj_name
        self.add_module(proj_name, nn.Linear(channels, channels))
        self.class_caps = ClassCaps(channels, classes, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.class_caps(getattr(self, self.proj_name)(self.pool(x)))


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU())


def tiny_stages(proj_name: str = "proj") -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "stem": nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()
        ),
        "layer1": _block(4, 4),
        "layer2": _block(4, 6),
        "layer3": _block(6, 6),
        "layer4": _block(6, 8),
        "adapter": nn.Identity(),
        "head": CapsHead(8, 3, proj_name),
    }


def backward(
    stages: dict[str, nn.Module], size: int = 8, batch: int = 2, device: str = "cpu"
) -> None:
    """One forward/backward pass through the stages in order."""
    torch.manual_seed(1)
    x = torch.randn(batch, 3, size, size, device=device)
    for stage in stages.values():
        x = stage(x)
    x.logsumexp(dim=1).sum().backward()


@pytest.fixture(scope="module")
def resnet_stages() -> dict[str, nn.Module]:
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None)
    stages = {
        "stem": nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool),
        "layer1": net.layer1,
        "layer2": net.layer2,
        "layer3": net.layer3,
        "layer4": net.layer4,
        "head": nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), net.fc),
    }
    backward(stages, size=32, batch=2)
    return stages


def _grad(p: nn.Parameter) -> torch.Tensor:
    # float64 reference: a float32 norm over millions of elements is itself
    # off by ~1e-4 relative, less accurate than the per-parameter batched norms.
    return (p.grad if p.grad is not None else torch.zeros_like(p)).double()


def _direct_stage(stage: nn.Module) -> tuple[float, float]:
    """Gradient and weight norm of a stage, the plain way."""
    params = [p for p in stage.parameters() if p.requires_grad]
    grad = torch.cat([_grad(p).flatten() for p in params]).norm().item()
    weight = torch.cat([p.detach().double().flatten() for p in params]).norm().item()
    return grad, weight


def _check_against_direct(stages: dict[str, nn.Module]) -> GradStats:
    stats = gradient_stats(stages)
    for name in trainable_stages(stages):
        grad, weight = _direct_stage(stages[name])
        assert stats.stage_norm[name] == pytest.approx(grad, rel=1e-4)
        assert stats.stage_ratio[name] == pytest.approx(grad / weight, rel=1e-4)
    everything = [p for s in stages.values() for p in s.parameters() if p.requires_grad]
    total = torch.cat([_grad(p).flatten() for p in everything]).norm().item()
    assert stats.total == pytest.approx(total, rel=1e-4)
    for key, params in weight_bearing_layers(stages).items():
        grads = torch.cat([_grad(p).flatten() for p in params])
        weights = torch.cat([p.detach().double().flatten() for p in params])
        assert stats.layer_norm[key] == pytest.approx(grads.norm().item(), rel=1e-4, abs=1e-12)
        assert stats.layer_ratio[key] == pytest.approx(
            grads.norm().item() / weights.norm().item(), rel=1e-4, abs=1e-12
        )
        # The batched L1 norm on CPU sums sequentially in float32 (~1e-3 off on
        # a 2.4M-element conv); ample for a log-scale plot.
        mean_abs = grads.abs().mean().item()
        assert stats.layer_mean_abs[key] == pytest.approx(mean_abs, rel=2e-3, abs=1e-15)
    assert not stats.nonfinite
    return stats


def test_tiny_model_matches_direct_computation() -> None:
    stages = tiny_stages()
    backward(stages)
    stats = _check_against_direct(stages)
    assert list(stats.stage_norm) == ["stem", "layer1", "layer2", "layer3", "layer4", "head"]
    assert list(stats.layer_norm) == [
        "stem.0", "stem.1",
        "layer1.0", "layer1.1", "layer2.0", "layer2.1",
        "layer3.0", "layer3.1", "layer4.0", "layer4.1",
        "head.proj", "head.class_caps",
    ]  # fmt: skip
    assert list(stats.layer_mean_abs) == list(stats.layer_norm)


def test_resnet50_matches_direct_computation(resnet_stages: dict[str, nn.Module]) -> None:
    stats = _check_against_direct(resnet_stages)
    # 53 convolutions + 53 batch norms + the classifier.
    assert len(stats.layer_norm) == 107
    keys = list(stats.layer_norm)
    expected = ["stem.0", "stem.1", "layer1.0.conv1", "layer1.0.downsample.0", "layer4.2.bn3"]
    positions = [keys.index(key) for key in expected + ["head.2"]]
    assert positions == sorted(positions)


def test_per_layer_false_keeps_stage_values(resnet_stages: dict[str, nn.Module]) -> None:
    full = gradient_stats(resnet_stages)
    lean = gradient_stats(resnet_stages, per_layer=False)
    assert lean.layer_norm == lean.layer_ratio == lean.layer_mean_abs == {}
    assert lean.stage_norm == pytest.approx(full.stage_norm)
    assert lean.stage_ratio == pytest.approx(full.stage_ratio)
    assert lean.total == pytest.approx(full.total)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_any_float_dtype_matches_vector_norm(dtype: torch.dtype) -> None:
    stages = {name: stage.to(dtype) for name, stage in tiny_stages().items()}
    gen = torch.Generator().manual_seed(4)
    for stage in stages.values():
        for p in stage.parameters():
            # 300 per element: its square overflows float16 (max 65504), the norms do not
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 300).to(dtype)
    stats = gradient_stats(stages)
    assert not stats.nonfinite

    def norm(tensors: list[torch.Tensor], order: int = 2) -> float:
        flat = torch.cat([t.detach().flatten() for t in tensors])
        return torch.linalg.vector_norm(flat, ord=order, dtype=torch.float64).item()

    # float32 results from float64 (or float32-accumulated half) norms: a few float32 roundings
    rel = 1e-5
    for name in trainable_stages(stages):
        params = list(stages[name].parameters())
        grad = norm([p.grad for p in params])
        assert stats.stage_norm[name] == pytest.approx(grad, rel=rel)
        assert stats.stage_ratio[name] == pytest.approx(grad / norm(params), rel=rel)
    assert stats.total == pytest.approx(norm([p.grad for s in stages.values() for p in s.parameters()]), rel=rel)
    for key, params in weight_bearing_layers(stages).items():
        assert stats.layer_norm[key] == pytest.approx(norm([p.grad for p in params]), rel=rel)
        mean_abs = norm([p.grad for p in params], order=1) / sum(p.numel() for p in params)
        assert stats.layer_mean_abs[key] == pytest.approx(mean_abs, rel=1e-4)


def test_missing_grad_counts_as_zero() -> None:
    stages = tiny_stages()
    backward(stages)
    for p in stages["layer2"].parameters():
        p.grad = None
    stats = _check_against_direct(stages)
    assert stats.stage_norm["layer2"] == 0.0
    assert stats.layer_mean_abs["layer2.0"] == 0.0


def test_renamed_submodule_is_still_found() -> None:
    plain, renamed = tiny_stages("proj"), tiny_stages("zz_unusual_name")
    backward(plain)
    backward(renamed)
    a, b = gradient_stats(plain), gradient_stats(renamed)
    assert "head.zz_unusual_name" in b.layer_norm
    assert b.layer_norm["head.zz_unusual_name"] == pytest.approx(a.layer_norm["head.proj"])
    assert b.stage_norm == pytest.approx(a.stage_norm)


def test_frozen_stages_are_absent() -> None:
    stages = tiny_stages()
    for name in ["stem", "layer1"]:
        stages[name].requires_grad_(False)
    stages["layer2"][1].requires_grad_(False)  # a frozen BN inside a trainable stage
    backward(stages)
    assert frozen_stages(stages) == ["stem", "layer1"]
    assert trainable_stages(stages) == ["layer2", "layer3", "layer4", "head"]
    assert list(weight_bearing_layers(stages))[0] == "layer2.0"
    stats = _check_against_direct(stages)
    for d in [stats.stage_norm, stats.stage_ratio]:
        assert not {"stem", "layer1", "adapter"} & set(d)
    for d in [stats.layer_norm, stats.layer_ratio, stats.layer_mean_abs]:
        assert not [k for k in d if k.startswith(("stem", "layer1", "adapter"))]
        assert "layer2.1" not in d
    for stage in stages.values():
        stage.requires_grad_(False)
    empty = gradient_stats(stages)
    assert empty.stage_norm == {} and empty.layer_norm == {} and empty.total == 0.0


def test_exactly_one_device_to_host_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    stages = tiny_stages()
    backward(stages)
    gradient_stats(stages)  # builds the cached segment indices
    calls: list[int] = []
    original = torch.Tensor.tolist

    def counting_tolist(self: torch.Tensor):
        calls.append(1)
        return original(self)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("unexpected device-to-host transfer")

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    for name in ["item", "cpu", "numpy", "__bool__", "__float__", "__int__"]:
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    gradient_stats(stages)
    first = len(calls)
    gradient_stats(stages, per_layer=False)
    monkeypatch.undo()
    assert first == 1
    assert len(calls) == 2


def _scale_grads(stage: nn.Module, factor: float) -> None:
    for p in stage.parameters():
        p.register_hook(lambda g, f=factor: g * f)


def test_alarm_fires_once_after_patience_on_vanishing_model() -> None:
    stages = tiny_stages()
    _scale_grads(stages["stem"], 1e-6)
    _scale_grads(stages["layer1"], 1e-6)
    alarm = VanishingAlarm(["stem", "layer1"], ratio=0.01, patience=3)
    events = []
    for step in range(0, 60, 10):
        for stage in stages.values():
            stage.zero_grad()
        backward(stages)
        events.append(alarm.update(gradient_stats(stages, per_layer=False), step))
    assert [e is not None for e in events] == [False, False, True, False, False, False]
    event = events[2]
    assert alarm.fired and event.step == 20 and event.threshold == 0.01 and event.ratio < 1e-4
    assert event.stage == "stem+layer1"
    assert event.message.startswith(
        "vanishing gradients: grad_norm/stem+layer1 has stayed below 1%"
    )
    assert "grad_norm/head for 3 logging steps" in event.message and "at step 20)" in event.message
    assert "\n" not in event.message


def test_alarm_silent_on_healthy_model() -> None:
    stages = tiny_stages()
    backward(stages)
    stats = gradient_stats(stages)
    alarm = VanishingAlarm(["stem", "layer1"], ratio=0.01, patience=2)
    assert all(alarm.update(stats, step) is None for step in range(10))
    assert not alarm.fired


def _stats(early: float, head: float = 1.0) -> GradStats:
    norms = {"stem": early, "layer1": early, "head": head}
    return GradStats(stage_norm=norms, stage_ratio=dict(norms), total=0.0)


def test_alarm_resets_on_healthy_step() -> None:
    alarm = VanishingAlarm(["stem", "layer1"], ratio=0.01, patience=3)
    sequence = [1e-5, 1e-5, 1.0, 1e-5, 1e-5, 1e-5, 1e-5]
    fired = [alarm.update(_stats(v), step) is not None for step, v in enumerate(sequence)]
    assert fired == [False, False, False, False, False, True, False]
    resumed = VanishingAlarm(["stem"], ratio=0.01, patience=1)
    resumed.mark_fired()
    assert resumed.fired and resumed.update(_stats(1e-5), 0) is None


def test_alarm_uses_combined_norm_of_early_stages() -> None:
    # Each early stage alone is below 1% of the head, but not their combination.
    alarm = VanishingAlarm(["stem", "layer1"], ratio=0.01, patience=1)
    assert alarm.update(_stats(0.008), 0) is None
    assert alarm.update(_stats(0.006), 1) is not None


def test_alarm_inert_when_early_stages_frozen() -> None:
    stages = tiny_stages()
    stages["stem"].requires_grad_(False)
    stages["layer1"].requires_grad_(False)
    _scale_grads(stages["layer2"], 1e-6)
    backward(stages)
    stats = gradient_stats(stages)
    alarm = VanishingAlarm(["stem", "layer1"], ratio=0.01, patience=1)
    assert all(alarm.update(stats, step) is None for step in range(5))
    assert not alarm.fired


def test_nonfinite_detection_names_the_stage() -> None:
    stages = tiny_stages()
    backward(stages)
    assert nonfinite_stage(stages) is None
    stages["layer3"][0].weight.grad[0, 0, 0, 0] = float("nan")
    assert gradient_stats(stages).nonfinite
    assert nonfinite_stage(stages) == "layer3"
    stages["layer1"][1].bias.grad[0] = float("inf")
    stats = gradient_stats(stages, per_layer=False)
    assert stats.nonfinite and math.isinf(stats.stage_norm["layer1"])
    assert nonfinite_stage(stages) == "layer1"


def test_median_over_run() -> None:
    nan = float("nan")
    history = [{"a": 1.0, "b": 10.0}, {"a": 3.0}, {"a": 2.0, "b": 20.0, "c": nan}, {"a": 5.0}]
    medians = median_over_run(history)
    assert list(medians) == ["a", "b", "c"]
    assert medians["a"] == 2.5 and medians["b"] == 15.0 and math.isnan(medians["c"])
    assert median_over_run([]) == {}


def test_gradient_flow_figure_renders_rgb() -> None:
    keys = [f"{s}.{i}" for s in ["stem", "layer1", "layer2", "layer3", "head"] for i in range(20)]
    rng = np.random.default_rng(0)
    history = [
        (step, dict(zip(keys, rng.lognormal(-8, 2, len(keys)).tolist()))) for step in (0, 50, 100)
    ]
    history[1][1][keys[3]] = 0.0  # a dead layer must not break the log scale
    image = gradient_flow_figure(history, title="gradient flow")
    assert image.ndim == 3 and image.shape[2] == 3 and image.dtype == np.uint8
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 50
    assert (image < 250).any(axis=2).mean() > 0.02  # more than a blank canvas
    empty = gradient_flow_figure([])
    assert empty.ndim == 3 and empty.dtype == np.uint8


def test_precomputed_gradient_norms_are_used_when_complete() -> None:
    stages = tiny_stages()
    backward(stages)
    params = [p for s in stages.values() for p in s.parameters() if p.requires_grad and p.grad is not None]
    exact = {id(p): p.grad.double().norm().float() for p in params}
    reference = gradient_stats(stages)
    given = gradient_stats(stages, grad_norms=exact)
    assert given.stage_norm == pytest.approx(reference.stage_norm, rel=1e-5)
    assert given.layer_norm == pytest.approx(reference.layer_norm, rel=1e-5)
    # they are really read, not recomputed: doubled norms double every gradient norm
    doubled = gradient_stats(stages, grad_norms={k: 2 * v for k, v in exact.items()})
    assert doubled.stage_norm == pytest.approx({k: 2 * v for k, v in reference.stage_norm.items()}, rel=1e-5)
    assert doubled.stage_ratio == pytest.approx({k: 2 * v for k, v in reference.stage_ratio.items()}, rel=1e-5)
    # a set that misses a parameter with a gradient is ignored
    partial = dict(list(exact.items())[1:])
    assert gradient_stats(stages, grad_norms={k: 2 * v for k, v in partial.items()}).stage_norm == \
        pytest.approx(reference.stage_norm, rel=1e-6)
