"""Why, not only whether: the gradient ladder against autograd and a closed form, routing telemetry
that sees small effects, the linear probes, and re-initialised stages."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from capsexp.diagnostics.probe import fit_probe
from capsexp.engine.assembly import build_loop, seed_everything
from capsexp.engine.loop import TrainState
from capsexp.engine.step import train_step
from capsexp.errors import UserError
from capsexp.models.backbone import build_backbone
from capsexp.models.classifier import build_model
from capsexp.models.heads import Measure
from capsexp.models.routing import ROUTINGS
from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.runtime import setup_runtime
from capsexp.train import train
from conftest import make_cfg

pytestmark = pytest.mark.usefixtures("one_thread")


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def one_logged_step(tmp_path: Path, *overrides: str) -> tuple[dict[str, float], dict[str, float]]:
    """One real training step with every diagnostic on: what the monitor logged for it, and the
    norms of dL/d(activation) that autograd gives for the same model, batch and loss."""
    cfg = make_cfg(*overrides, "data.image_size=64", "grads.log_every_n_steps=1", "grads.figure_every_n_steps=0")
    seed_everything(0)
    rt = setup_runtime(cfg.trainer)
    loop = build_loop(cfg, rt, 8, 4, tmp_path / "tb", show_progress=False)
    images, targets = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    reference = copy.deepcopy(loop.objective)  # the same weights and BatchNorm state, before the step
    out = reference(images, targets, torch.tensor(0.0, dtype=torch.float64), Measure(telemetry=True))
    grads = torch.autograd.grad(out.loss, list(out.hops.values()), allow_unused=True)
    expected = {name: float(g.norm()) for name, g in zip(out.hops, grads) if g is not None}
    loop.objective.train()
    train_step(loop, images, targets, TrainState())
    loop.logger.close()
    logged = {tag.split("/", 1)[1]: points[-1][1] for tag, points in scalars(tmp_path / "tb").items()
              if tag.startswith(("grad_ladder/", "grad_norm/features"))}
    return logged, expected


def test_the_fc_ladder_follows_the_closed_form_of_average_pooling(tmp_path: Path) -> None:
    logged, expected = one_logged_step(tmp_path, "head=fc")
    assert list(expected) == ["scores", "pooled", "features"]  # scores to features, in order
    # global average pooling spreads dL/d(pooled) evenly over the H x W positions of the 2x2 map:
    # ||dL/dF|| = ||dL/d(pooled)|| / sqrt(HW); a planted sqrt missing would be off by 2x
    assert logged["features"] == pytest.approx(logged["pooled"] / math.sqrt(4), rel=1e-5)
    assert logged["features"] != pytest.approx(logged["pooled"] / 4, rel=1e-2)
    # the ladder's last hop is grad_norm/features: the same measurement, the same number
    assert logged["features"] == _tag(tmp_path, "grad_norm/features")
    for hop, value in expected.items():
        assert logged[hop] == pytest.approx(value, rel=1e-5), hop


def _tag(tmp_path: Path, tag: str) -> float:
    return scalars(tmp_path / "tb")[tag][-1][1]


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_every_capsule_hop_is_autograd_of_the_loss(routing: str, tmp_path: Path) -> None:
    logged, expected = one_logged_step(tmp_path, "head=capsule", "adapter=conv", f"head.routing.name={routing}")
    assert next(iter(expected)) == "scores" and list(expected)[-2:] == ["adapter", "features"]
    assert len(expected) >= 5 and set(expected) <= set(logged)
    for hop, value in expected.items():
        assert logged[hop] == pytest.approx(value, rel=1e-5, abs=1e-12), (routing, hop)
    ratios = scalars(tmp_path / "tb")
    hops = list(expected)
    for before, hop in zip(hops, hops[1:]):
        if logged[before] > 0:
            assert ratios[f"grad_ladder_ratio/{hop}"][-1][1] == pytest.approx(logged[hop] / logged[before], rel=1e-5)


def test_dynamic_routing_names_the_hops_of_its_paper(tmp_path: Path) -> None:
    _, expected = one_logged_step(tmp_path, "head=capsule", "adapter=conv")
    assert list(expected) == ["scores", "class_capsules", "presquash", "votes", "primary", "primary_presquash",
                              "adapter", "features"]


@pytest.mark.parametrize("routing", ["dynamic", "attention", "em"])
def test_one_iteration_routes_nothing_exactly(routing: str, tmp_path: Path) -> None:
    train(make_cfg("head=capsule", "adapter=conv", f"head.routing.name={routing}", "head.routing.iterations=1",
                   "trainer.max_steps=2"), run_dir=tmp_path / "run")
    tags = scalars(tmp_path / "run")
    assert [v for _, v in tags["routing/entropy_deficit"]] == [0.0, 0.0]
    assert [v for _, v in tags["routing/change"]] == [0.0, 0.0]
    assert [v for _, v in tags["routing/gain"]] == [1.0, 1.0]


def test_a_large_logit_scale_makes_dynamic_routing_decide(tmp_path: Path) -> None:
    values = {}
    for scale in (1, 100):
        run = tmp_path / f"scale{scale}"
        metrics = train(make_cfg("head=capsule", "adapter=conv", "data.image_size=64", "trainer.max_steps=1",
                                 f"head.routing.logit_scale={scale}"), run_dir=run)
        values[scale] = metrics
        # metrics.json keeps the full precision; TensorBoard's float32 the same value to 6 digits
        assert math.isclose(metrics["routing/entropy_deficit"], scalars(run)["routing/entropy_deficit"][0][1],
                            rel_tol=1e-6)
    # at lambda = 1 the agreements are too small to move the couplings: the deficit is 1e-6 of log J
    assert 0 < values[1]["routing/entropy_deficit"] < 1e-4
    assert values[100]["routing/entropy_deficit"] > 1e-3 and values[100]["routing/change"] > 0.1
    assert values[100]["routing/max_coupling"] > values[1]["routing/max_coupling"]


def test_the_probe_separates_what_is_separable_and_not_what_is_not() -> None:
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=generator, dtype=torch.float64) * 4
    labels = torch.arange(200) % 4
    features = centres[labels] + torch.randn(200, 16, generator=generator, dtype=torch.float64)
    assert fit_probe(features[:100], labels[:100], features[100:], labels[100:], 4) == 1.0
    shuffled = labels[torch.randperm(200, generator=generator)]  # labels unrelated to the features
    assert fit_probe(features[:100], shuffled[:100], features[100:], shuffled[100:], 4) < 0.5
    # the same call, the same accuracy: a pure function
    assert fit_probe(features[:100], labels[:100], features[100:], labels[100:], 4) == 1.0


def test_probes_are_written_at_step_0_and_at_every_probe_validation(tmp_path: Path) -> None:
    train(make_cfg("trainer.max_steps=6", "data.train_size=16", "trainer.max_epochs=3", "data.val_size=16",
                   "grads.probe.images=16", "grads.probe.every_n_validations=2"), run_dir=tmp_path / "run")
    tags = scalars(tmp_path / "run")
    validations = [s for s, _ in tags["val/acc"]]
    assert validations == [2, 4, 6]
    for stage in ("stem", "layer1", "layer2", "layer3", "layer4"):
        points = tags[f"probe/{stage}"]
        assert [s for s, _ in points] == [0, 4] and all(0.0 <= v <= 1.0 for _, v in points)


@pytest.mark.slow
def test_a_backbone_trained_on_the_task_has_a_layer4_probe_above_chance(tmp_path: Path) -> None:
    trained = tmp_path / "trained"
    # 32 px (a 1x1 map at layer4) learns the shapes as well as 64 px in half the time: probe 0.29 here
    train(make_cfg("data.image_size=32", "data.train_size=2000", "data.val_size=64", "data.batch_size=32",
                   "trainer.max_epochs=3", "trainer.max_steps=null", "optim.lr=0.002", "grads.probe.images=0",
                   "grads.drift.probe_images=0", "trainer.log_every_n_steps=50", "grads.log_every_n_steps=50",
                   "grads.figure_every_n_steps=0", tiny=True), run_dir=trained)
    run = tmp_path / "probe"
    # 512 probe images: chance 0.125 give or take 2 standard errors of 0.015
    train(make_cfg("data.image_size=32", "data.train_size=512", "data.val_size=512",
                   f"backbone.weights={trained / 'checkpoints' / 'last.pt'}", "grads.probe.images=512",
                   "trainer.max_steps=1"), run_dir=run)
    layer4 = scalars(run)["probe/layer4"][0]
    chance, standard_error = 1 / 8, math.sqrt(1 / 8 * 7 / 8 / 512)
    assert layer4[0] == 0 and layer4[1] > chance + 2 * standard_error, layer4


def test_reinit_draws_fresh_stages_after_the_weights_are_loaded(tmp_path: Path) -> None:
    source = tmp_path / "source"
    train(make_cfg("trainer.max_steps=2"), run_dir=source)
    weights = str(source / "checkpoints" / "last.pt")
    loaded = build_model(make_cfg(f"backbone.weights={weights}"), 8).backbone
    torch.manual_seed(1)
    reinit = build_model(make_cfg(f"backbone.weights={weights}", "backbone.reinit=[stem,layer1]"), 8).backbone
    fresh = build_backbone(make_cfg("backbone.reinit=[]").backbone)
    for name, param in reinit.stages()["stem"].named_parameters():
        assert not torch.equal(param, dict(loaded.stages()["stem"].named_parameters())[name]), name
    # torchvision's initialisation: Kaiming normal (fan-out) for convolutions, so the stem's 7x7 conv
    # weights have the fresh trunk's spread, sqrt(2 / fan_out), and BatchNorm starts at 1 and 0
    conv, fresh_conv = reinit.stages()["stem"]["conv1"].weight.detach(), fresh.stages()["stem"]["conv1"].weight.detach()
    fan_out = conv.shape[0] * conv.shape[2] * conv.shape[3]
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.05)
    assert float(conv.std()) == pytest.approx(float(fresh_conv.std()), rel=0.05)
    assert torch.equal(reinit.stages()["stem"]["bn1"].weight, torch.ones(64))
    # later stages keep the loaded weights exactly
    for (name, a), b in zip(reinit.stages()["layer2"].state_dict().items(), loaded.stages()["layer2"].state_dict().values()):
        assert torch.equal(a, b), name
    metrics = train(make_cfg(f"backbone.weights={weights}", "backbone.reinit=[stem,layer1]", "trainer.max_steps=2"),
                    run_dir=tmp_path / "run")
    assert metrics["status"] == "completed" and metrics["grad_norm/stem"] > 0
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["config"]["backbone"]["reinit"] == \
        ["stem", "layer1"]


@pytest.mark.parametrize("overrides, message", [
    (["backbone.reinit=[stem,layer9]"], "backbone.reinit=['stem', 'layer9'] is not allowed; it must be a list of "
                                        "distinct stages drawn from stem, layer1, layer2, layer3, layer4"),
    (["backbone.reinit=[layer1]", "backbone.freeze_depth=2"], "backbone.reinit names layer1, which "
                                                              "backbone.freeze_depth=2 freezes"),
])
def test_reinit_of_a_missing_or_frozen_stage_is_one_sentence(overrides: list[str], message: str,
                                                             tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^" + message.replace("[", r"\[").replace("]", r"\]")):
        train(make_cfg(*overrides), run_dir=tmp_path / "run")
    assert not (tmp_path / "run").exists()
