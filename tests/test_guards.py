"""Runs that cannot go well stop early and say why: non-finite models, steps that cannot fit or
cannot normalise, values that cannot be resolved; and metrics.json counts skipped images."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import capsexp.engine.assembly as assembly
from capsexp.engine.assembly import build_loop
from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.config.validation import validate
from capsexp.engine.loop import StopTraining
from capsexp.errors import UserError
from capsexp.engine.guards import first_nonfinite
from capsexp.runtime import setup_runtime
from capsexp.train import train
from conftest import TINY, make_cfg, run_cli

SMALL = [*TINY, "data.train_size=16", "grads.figure_every_n_steps=0"]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("capsexp: error:") or "Traceback" in line]


def _all_finite(path: Path) -> bool:
    ckpt = load_checkpoint(path)
    tensors = [*ckpt["model"].values(), *(v for s in ckpt["optimizer"]["state"].values() for v in s.values())]
    return all(torch.isfinite(t).all() for t in tensors if torch.is_tensor(t) and t.is_floating_point())


@pytest.mark.slow
@pytest.mark.parametrize("overrides, stopped_at, kept", [
    # the reported case: ResNet50, SGD at lr 1e3, 32 px; the first validation is already NaN
    (["backbone=resnet50", "optim.lr=1e3", "optim.warmup_steps=0"], 2, None),
    # a warm-up keeps the first two steps sane: one good checkpoint exists when the model diverges
    (["backbone=resnet18", "optim.lr=30", "optim.warmup_steps=8"], 6, 4),
])
def test_a_diverging_run_stops_at_validation_and_keeps_only_finite_checkpoints(
        overrides: list[str], stopped_at: int, kept: int | None, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # two steps per epoch: a validation (and a checkpoint) after every second step
    proc = run_cli("train", *SMALL, "trainer.max_epochs=4", "trainer.max_steps=8", "optim=sgd",
                   "optim.momentum=0", "grads.enabled=false", *overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    lines = _error_lines(proc.stderr)
    assert proc.returncode == 3 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith(f"capsexp: error: non-finite values after step {stopped_at}: ")
    assert "trainer.on_nonfinite=skip cannot skip this" in lines[0]
    if kept is None:
        assert lines[0].endswith("Stopped; no checkpoint had been written in run yet, so none was kept.")
    else:
        assert lines[0].endswith(f"Stopped; the last good checkpoint, run/checkpoints/last.pt (step {kept}), "
                                 f"is kept as it was.")  # shown relative to the working folder
    saved = sorted((run / "checkpoints").glob("*.pt")) if (run / "checkpoints").exists() else []
    assert len(saved) == (0 if kept is None else 1) and all(_all_finite(p) for p in saved)
    assert json.loads((run / "metrics.json").read_text())["status"] == "failed"


def test_an_infinite_batchnorm_buffer_or_optimizer_moment_is_named(tmp_path: Path) -> None:
    cfg = make_cfg("backbone=resnet18")
    rt = setup_runtime(cfg.trainer)
    loop = build_loop(cfg, rt, 8, 4, None, False)
    assert first_nonfinite(loop.model, loop.optimizer, rt) is None
    loop.model.backbone.layer3[0].bn2.running_var[5] = float("inf")
    assert first_nonfinite(loop.model, loop.optimizer, rt) == "backbone.layer3.0.bn2.running_var"
    loop.model.backbone.layer3[0].bn2.running_var.fill_(1.0)
    weight = loop.model.backbone.conv1.weight
    loop.optimizer.state[weight]["exp_avg_sq"] = torch.full_like(weight, float("nan"))
    assert first_nonfinite(loop.model, loop.optimizer, rt) == "optimizer exp_avg_sq of backbone.conv1.weight"
    huge = loop.model.backbone.conv1.weight
    loop.optimizer.state[huge]["exp_avg_sq"] = torch.full_like(huge, 3e38)  # finite, near the fp32 limit
    assert first_nonfinite(loop.model, loop.optimizer, rt) is None


def test_a_non_finite_gradient_on_a_fresh_run_says_nothing_was_kept(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    real = assembly.build_model

    def build(cfg, num_classes):  # type: ignore[no-untyped-def]
        model = real(cfg, num_classes)
        model.backbone.layer2[0].conv1.weight.register_hook(lambda grad: grad * float("nan"))
        return model

    monkeypatch.setattr(assembly, "build_model", build)
    with pytest.raises(StopTraining) as info:
        train(make_cfg("backbone=resnet18", "trainer.max_steps=2"), run_dir=tmp_path)
    assert str(info.value).startswith("non-finite gradient at step 1; first stage with non-finite gradients: ")
    assert str(info.value).endswith(f"Stopped; no checkpoint had been written in {tmp_path} yet, so none was kept.")
    assert not list(tmp_path.rglob("*.pt"))


@pytest.mark.parametrize("overrides, message", [
    # one case in the quick suite; each further case is another process start
    (["data.image_size=100000"], "data.image_size=100000 with data.batch_size=8 needs at least "),
    pytest.param(["data.image_size=100000", "data.batch_size=1"],
                 "data.image_size=100000 with data.batch_size=1 needs at ", marks=pytest.mark.slow),
    pytest.param(["data.batch_size=1"], "data.batch_size=1 with data.image_size=32 (a 1x1 feature map) gives "
                 "BatchNorm in layer4 one value per channel, which it cannot train on; use data.batch_size >= 2 "
                 "(per process) or data.image_size >= 33.", marks=pytest.mark.slow),
    pytest.param(["data.batch_size=1", "backbone.freeze_depth=5", "adapter=conv", "adapter.norm=batch"],
                 "data.batch_size=1 with data.image_size=32 (a 1x1 feature map) gives BatchNorm in the conv adapter",
                 marks=pytest.mark.slow),
    pytest.param([f"seed={2**64}"], f"seed={2**64} is not allowed; it must be an integer from 0 to 2**63 - 1.",
                 marks=pytest.mark.slow),
])
def test_what_a_step_would_crash_on_is_one_sentence_before_anything_is_written(
        overrides: list[str], message: str, tmp_path: Path) -> None:
    proc = run_cli("train", *TINY, *overrides, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"capsexp: error: {message}"), lines
    if "needs at least" in message:
        assert "lower data.image_size or data.batch_size." in lines[0]
    assert not (tmp_path / "run").exists()


def test_batchnorm_on_one_image_is_refused_only_where_it_cannot_work() -> None:
    validate(make_cfg("data.batch_size=1", "data.image_size=64"))  # a 2x2 map: four values per channel
    validate(make_cfg("data.batch_size=1", "backbone.freeze_depth=5"))  # layer4 frozen: eval mode
    validate(make_cfg("data.batch_size=1", "backbone.freeze_depth=5", "adapter=conv", "adapter.norm=group"))
    with pytest.raises(UserError, match="data.batch_size=1 with data.image_size=32"):
        validate(make_cfg("data.batch_size=1"))


def test_an_unset_environment_variable_is_one_sentence_naming_the_key(tmp_path: Path) -> None:
    proc = run_cli("train", *TINY, "data.root=${oc.env:CAPSEXP_TEST_NOPE}", f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == ("capsexp: error: data.root='${oc.env:CAPSEXP_TEST_NOPE}' cannot be resolved "
                        "(Environment variable 'CAPSEXP_TEST_NOPE' not found); set what it refers to, "
                        "or pass a plain value.")
    assert not list((tmp_path / "run").glob("*.pt"))


def test_metrics_count_the_skipped_images(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    for c in ("a", "b"):
        (tmp_path / "images" / c).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(40, 40, 3, generator=gen) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / c / f"{i}.png")
    (tmp_path / "images" / "a" / "broken.png").write_text("not an image")
    tiny = [a for a in TINY if not a.startswith(("data.train_size", "data.val_size", "data.batch_size"))]
    cfg = make_cfg("data=imagefolder", f"data.root={tmp_path / 'images'}", "data.on_bad_image=skip",
                   "data.val_fraction=0.25", "data.batch_size=3", "data.num_workers=0", "backbone=resnet18", "trainer.max_epochs=2",
                   "trainer.max_steps=6", *tiny, "grads.figure_every_n_steps=0", tiny=False)
    metrics = train(cfg, run_dir=tmp_path / "run")
    assert metrics["bad_images"] == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["bad_images"] == 1
    shapes = train(make_cfg("backbone=resnet18", "trainer.max_steps=1"), run_dir=tmp_path / "shapes")
    assert shapes["bad_images"] == 0
