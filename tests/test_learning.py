"""What each stage learns: update/weight ratios, the features gradient, drift (CKA) and the alarms,
checked against independent formulas and on real runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from capsexp.diagnostics.features import feature_gradient
from capsexp.diagnostics.gradients import snapshot, update_stats
from capsexp.diagnostics.drift import centred_gram, linear_cka
from capsexp.train import train
from conftest import make_cfg, run_cli


def _stages(seed: int = 0) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"stem": nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "layer1": nn.Conv2d(4, 6, 3),
            "head": nn.Linear(6, 3)}


def _loss(stages: dict[str, nn.Module]) -> torch.Tensor:
    x = torch.randn(5, 3, 9, 9, generator=torch.Generator().manual_seed(1))
    features = stages["layer1"](stages["stem"](x)).mean(dim=(2, 3))
    return stages["head"](features).logsumexp(dim=1).mean()


def _params(stages: dict[str, nn.Module]) -> list[nn.Parameter]:
    return [p for s in stages.values() for p in s.parameters()]


def _norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().square().sum()) for t in tensors))


def test_plain_sgd_update_to_weight_is_lr_times_grad_to_weight() -> None:
    stages, lr = _stages(), 0.37
    optimizer = torch.optim.SGD(_params(stages), lr=lr)  # no momentum, no weight decay, constant lr
    _loss(stages).backward()
    expected = {name: lr * _norm([p.grad for p in s.parameters()]) / _norm([p for p in s.parameters()])
                for name, s in stages.items()}
    before = snapshot(_params(stages))
    optimizer.step()
    stats = update_stats(stages, before)
    assert stats.stage_ratio == pytest.approx(expected, rel=1e-5)
    # per layer too: the stem's conv and its BatchNorm each on their own
    conv = stages["stem"][0]
    layer = lr * _norm([conv.weight.grad, conv.bias.grad]) / _norm([before[0], before[1]])
    assert stats.layer_ratio["stem.0"] == pytest.approx(layer, rel=1e-5)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_adamw_first_step_moves_lr_per_element_plus_decoupled_decay(weight_decay: float) -> None:
    stages, lr = _stages(), 1e-3
    optimizer = torch.optim.AdamW(_params(stages), lr=lr, weight_decay=weight_decay, eps=1e-12)
    _loss(stages).backward()
    before = snapshot(_params(stages))
    optimizer.step()
    stats = update_stats(stages, before)
    for name, stage in stages.items():
        params = list(stage.parameters())
        start = before[sum(len(list(s.parameters())) for s in list(stages.values())[:list(stages).index(name)]):][
            :len(params)]
        # first Adam step: m_hat = g, v_hat = g^2, so the step is lr * sign(g) on every element with a
        # non-zero gradient; AdamW first multiplies the weights by (1 - lr * wd)
        delta = [-lr * weight_decay * w - lr * torch.sign(p.grad) for w, p in zip(start, params)]
        expected = _norm(delta) / _norm(start)
        if weight_decay == 0:
            nonzero = sum(int((p.grad != 0).sum()) for p in params)
            assert _norm(delta) == pytest.approx(lr * math.sqrt(nonzero), rel=1e-6)
        assert stats.stage_ratio[name] == pytest.approx(expected, rel=1e-4)


def test_frozen_stages_write_no_update_ratio() -> None:
    stages = _stages()
    stages["stem"].requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in _params(stages) if p.requires_grad], lr=0.1)
    _loss(stages).backward()
    before = snapshot([p for p in _params(stages) if p.requires_grad])
    optimizer.step()
    assert list(update_stats(stages, before).stage_ratio) == ["layer1", "head"]


def _hsic(k: np.ndarray, l: np.ndarray) -> float:
    n = k.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    return float(np.trace(k @ h @ l @ h)) / (n - 1) ** 2


def test_linear_cka_equals_the_centred_hsic_formula_and_its_invariances() -> None:
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(20, 7)), rng.normal(size=(20, 5))
    y[:, :3] += x[:, :3]  # related, not identical
    kx, ky = x @ x.T, y @ y.T
    direct = _hsic(kx, ky) / math.sqrt(_hsic(kx, kx) * _hsic(ky, ky))
    # the feature-space form of Kornblith et al. (2019), eq. 3, on centred features
    xc, yc = x - x.mean(0), y - y.mean(0)
    feature_form = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    ours = linear_cka(centred_gram(torch.from_numpy(x)), centred_gram(torch.from_numpy(y)))
    assert ours == pytest.approx(direct, rel=1e-10) and ours == pytest.approx(feature_form, rel=1e-10)
    assert 0 < ours < 1
    gx = centred_gram(torch.from_numpy(x))
    assert linear_cka(gx, gx) == pytest.approx(1.0, rel=1e-12)
    q, _ = np.linalg.qr(rng.normal(size=(7, 7)))  # an orthogonal transform, then an isotropic scale
    moved = centred_gram(torch.from_numpy(3.5 * x @ q))
    assert linear_cka(gx, moved) == pytest.approx(1.0, rel=1e-10)
    assert linear_cka(centred_gram(torch.from_numpy(y)), moved) == pytest.approx(ours, rel=1e-10)
    # feature maps [N, C, h, w] are flattened per example
    maps = torch.from_numpy(rng.normal(size=(20, 2, 3, 3)))
    assert torch.allclose(centred_gram(maps), centred_gram(maps.flatten(1)))


def test_the_features_gradient_is_autograd_of_the_loss_on_the_feature_map() -> None:
    from capsexp.diagnostics.features import FeatureGradient
    from capsexp.models.classifier import build_model

    torch.manual_seed(0)
    model = build_model(make_cfg("head=capsule", "adapter=conv", "data.image_size=64"), num_classes=4)
    images, probe = torch.randn(3, 3, 64, 64), FeatureGradient(model.backbone)
    probe.arm()
    kept: list[torch.Tensor] = []
    model.backbone.register_forward_hook(lambda m, a, out: kept.append(out))
    loss = model(images).scores.square().sum()
    (expected,) = torch.autograd.grad(loss, kept[0], retain_graph=True)
    loss.backward()
    captured = probe.take()
    assert captured is not None and kept[0].shape[1:] == (model.backbone.out_channels, 2, 2)
    torch.testing.assert_close(captured.norm, expected.norm())
    torch.testing.assert_close(captured.position_map, expected.square().sum(1).sqrt().mean(0))
    assert feature_gradient(expected).position_map.shape == (2, 2)
    # armed once: the next forward (an evaluation, say) leaves nothing behind
    model(images).scores.sum().backward()
    assert probe.take() is None


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


def test_a_real_run_writes_the_learning_tags_and_metrics(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg("head=capsule", "adapter=conv", "adapter.width=32", "backbone.freeze_depth=1",
                   "trainer.max_steps=4", "grads.log_every_n_steps=2", "grads.figure_every_n_steps=0",
                   "grads.drift.probe_images=8"), run_dir=tmp_path)
    events = sorted(tmp_path.rglob("events.out.tfevents.*"))
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    scalars, trained = set(acc.Tags()["scalars"]), ["layer1", "layer2", "layer3", "layer4", "adapter", "head"]
    assert {f"update_to_weight/{s}" for s in trained} <= scalars
    assert not any(t.endswith("/stem") for t in scalars)  # frozen: nothing at all
    assert "update_to_weight_layer/layer1.0.conv1" in scalars and "grad_norm/features" in scalars
    assert [e.step for e in acc.Scalars("update_to_weight/layer1")] == [2, 4]
    assert "grad_map/features" in acc.Tags()["images"]
    assert {f"drift/{s}" for s in trained} <= scalars
    metrics = _metrics(tmp_path)
    assert all(0 < metrics[f"update_to_weight/{s}"] <= metrics[f"max/update_to_weight/{s}"] for s in trained)
    assert all(-1e-9 <= metrics[f"drift/{s}"] <= 1 + 1e-9 for s in trained) and "drift/stem" not in metrics
    assert metrics["drift/layer1"] < 1  # four steps of AdamW moved what layer1 computes
    assert metrics["grad_norm/features"] > 0


def test_skipped_updates_write_no_update_ratio(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import capsexp.models.losses as losses

    # the loss of steps 2 and 3 is infinite (a planted fault, so the model itself stays finite): both
    # updates are skipped, and the steps around them are written
    forward = losses.ScaledCrossEntropy.forward
    calls = iter(range(1000))

    def planted(self: torch.nn.Module, scores: torch.Tensor, targets: torch.Tensor, progress: float = 0.0
                ) -> torch.Tensor:
        loss = forward(self, scores, targets, progress)
        return loss * float("inf") if torch.is_grad_enabled() and next(calls) in (1, 2) else loss

    monkeypatch.setattr(losses.ScaledCrossEntropy, "forward", planted)
    train(make_cfg("trainer.on_nonfinite=skip", "trainer.max_steps=4", "grads.figure_every_n_steps=0",
                   "grads.drift.probe_images=0"), run_dir=tmp_path)
    metrics = _metrics(tmp_path)
    assert metrics["skipped_steps"] == 2
    acc = EventAccumulator(str(sorted(tmp_path.rglob("events.out.tfevents.*"))[0].parent))
    acc.Reload()
    written = [e.step for e in acc.Scalars("update_to_weight/head")]
    skipped = {e.step for e in acc.Scalars("train/skipped_steps")}
    assert written and not skipped & set(written)
    assert len(written) == 4 - metrics["skipped_steps"]


@pytest.mark.slow
def test_sgd_at_a_high_learning_rate_is_named_by_the_exploding_alarm(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_cli("train", "backbone=resnet18", "data.image_size=32", "data.train_size=96", "data.val_size=16",
                   "data.batch_size=8", "trainer.max_steps=12", "trainer.progress=false", "optim=sgd", "optim.lr=5",
                   "optim.warmup_steps=0", "grads.log_every_n_steps=2", "grads.figure_every_n_steps=0",
                   "trainer.on_nonfinite=skip", f"hydra.run.dir={run}", cwd=tmp_path, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = _metrics(run)
    message = metrics["alarm/exploding"]
    assert message and message.startswith("exploding: ") and " at step " in message
    assert any(f"/{stage} " in message for stage in ("stem", "layer1", "layer2", "layer3", "layer4", "head"))
    assert f"capsexp: WARNING {message}" in done.stderr


def test_resume_reproduces_drift(tmp_path: Path) -> None:
    common = ["trainer.max_steps=6", "trainer.max_epochs=3", "data.train_size=16", "grads.figure_every_n_steps=0",
              "grads.drift.probe_images=8"]  # 2 steps per epoch: a validation (and drift) every 2 steps
    whole = train(make_cfg(*common), run_dir=tmp_path / "whole")
    from capsexp.engine.loop import StopTraining

    with pytest.raises(StopTraining, match=r"interrupted at step \d+"):  # mid-epoch, after one validation
        _interrupt_after(make_cfg(*common), tmp_path / "parts", steps=3)
    resumed = train(make_cfg(*common, "trainer.resume=auto"), run_dir=tmp_path / "parts")
    drift = {k: v for k, v in whole.items() if k.startswith("drift/")}
    assert drift and {k: resumed[k] for k in drift} == pytest.approx(drift, rel=1e-9, abs=1e-12)


def _interrupt_after(cfg, run_dir: Path, steps: int) -> None:
    """A run stopped by SIGTERM after ``steps`` steps (the way a cluster pre-empts a job)."""
    import os
    import signal

    from capsexp.engine import step as engine

    real = engine.train_step

    def step_then_signal(loop, images, targets, state):  # noqa: ANN001, ANN202
        out = real(loop, images, targets, state)
        if state.step + 1 == steps:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    engine.train_step = step_then_signal
    try:
        train(cfg, run_dir=run_dir)
    finally:
        engine.train_step = real
