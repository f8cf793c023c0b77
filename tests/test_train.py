"""``train(cfg)`` end to end into a temporary folder: outputs, tags, checkpoints, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.errors import UserError
from capsexp.train import train
from conftest import make_cfg

RUNNER_TAGS = {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "throughput/images_per_sec"}
METRIC_KEYS = {"val/acc", "val/loss", "best/val/acc", "train/loss", "steps", "epochs", "images_per_sec"}


def scalar_tags(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Read the event files back with tensorboard's own reader, keeping every point."""
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def fc_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    run_dir = tmp_path_factory.mktemp("fc_run")
    metrics = train(make_cfg("trainer.max_steps=6", "trainer.max_epochs=2", "data.train_size=32"),
                    run_dir=run_dir)
    return run_dir, metrics


def test_a_run_writes_events_a_checkpoint_and_metrics(fc_run: tuple[Path, dict]) -> None:
    run_dir, metrics = fc_run
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.pt"]  # trainer.checkpoints=last
    assert list(run_dir.glob("events.out.tfevents.*"))  # in the run folder itself: TensorBoard's run name
    on_disk = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= set(on_disk)
    assert on_disk["steps"] == 6 and on_disk["epochs"] == 1  # 32 images / batch 8 = 4 per epoch
    assert on_disk == json.loads(json.dumps(metrics))
    assert on_disk["images_per_sec"] > 0
    assert (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()


def test_event_files_hold_the_runner_tags(fc_run: tuple[Path, dict]) -> None:
    tags = scalar_tags(fc_run[0])
    assert RUNNER_TAGS <= set(tags)
    assert [step for step, _ in tags["train/loss"]] == list(range(1, 7))  # x-axis: optimizer step
    assert len(tags["val/acc"]) == 2  # one validation per epoch


def test_best_is_last_until_validation_stops_improving(tmp_path: Path) -> None:
    from capsexp.rundir.checkpoint import link_checkpoint, save_checkpoint

    last, best = tmp_path / "last.pt", tmp_path / "best.pt"
    save_checkpoint({"step": 1}, last)
    link_checkpoint(last, best)  # epoch 1 improved: best is the very checkpoint last is
    assert best.read_bytes() == last.read_bytes()
    assert load_checkpoint(best) == load_checkpoint(last)
    save_checkpoint({"step": 2}, last)  # epoch 2 did not improve
    assert load_checkpoint(best)["step"] == 1 and load_checkpoint(last)["step"] == 2


def test_checkpoint_holds_everything_needed_to_continue(fc_run: tuple[Path, dict]) -> None:
    ckpt = load_checkpoint(fc_run[0] / "checkpoints" / "last.pt")
    for key in ("model", "optimizer", "scheduler", "state", "config", "num_classes"):
        assert key in ckpt
    assert ckpt["state"]["step"] == 6
    assert ckpt["config"]["head"]["name"] == "fc"


@pytest.mark.slow
def test_resume_continues_the_step_count_and_schedule(tmp_path: Path) -> None:
    args = ("trainer.max_epochs=3", "data.train_size=32", "optim.warmup_steps=2")
    straight = tmp_path / "straight"
    train(make_cfg("trainer.max_steps=8", *args), run_dir=straight)
    first = tmp_path / "first"
    train(make_cfg("trainer.max_steps=4", *args), run_dir=first)
    resumed = tmp_path / "resumed"
    ckpt = first / "checkpoints" / "last.pt"
    metrics = train(make_cfg("trainer.max_steps=8", *args, f"trainer.resume={ckpt}"), run_dir=resumed)
    assert metrics["steps"] == 8
    tags, reference = scalar_tags(resumed), scalar_tags(straight)
    assert [s for s, _ in tags["train/loss"]] == [5, 6, 7, 8]  # continues at step 5, never restarts at 1
    # the schedule continues at its position: the same learning rates as a run that never stopped
    assert [s for s, _ in tags["lr"]] == [s for s, _ in reference["lr"][4:]]
    assert [v for _, v in tags["lr"]] == pytest.approx([v for _, v in reference["lr"][4:]])


def test_a_run_folder_is_never_overwritten(fc_run: tuple[Path, dict]) -> None:
    run_dir, _ = fc_run
    before = (run_dir / "metrics.json").read_bytes()
    with pytest.raises(UserError, match="never overwrites"):
        train(make_cfg(), run_dir=run_dir)
    assert (run_dir / "metrics.json").read_bytes() == before


def test_frozen_backbone_trains_only_adapter_and_head(tmp_path: Path) -> None:
    metrics = train(make_cfg("backbone.freeze_depth=5", "adapter=conv", "adapter.width=16",
                              "trainer.max_steps=2"), run_dir=tmp_path)
    assert "grad_norm/stem" not in metrics and "grad_norm/head" in metrics
    ckpt = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    fresh = make_cfg()
    assert ckpt["config"]["backbone"]["freeze_depth"] == 5 and fresh.backbone.freeze_depth == 0
    tags = scalar_tags(tmp_path)
    assert not any(t.startswith(("grad_norm/layer", "grad_norm/stem")) for t in tags)
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))


def _noise_folder(root: Path, classes: int = 2, per_class: int = 20) -> Path:
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(40, 40, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_mid_epoch_resume_with_random_augmentation_repeats_the_same_steps(tmp_path: Path) -> None:
    """Random crops and flips (image folders train with them), a stop inside an epoch, loader
    workers only after the resume: the resumed steps are the uninterrupted run's steps."""
    root = _noise_folder(tmp_path / "images")
    args = ("backbone=resnet18", "data=imagefolder", f"data.root={root}", "data.image_size=32", "data.batch_size=8",
            "data.val_fraction=0.2", "trainer.max_epochs=2", "optim.scheduler=constant",
            "optim.warmup_steps=0", "trainer.log_every_n_steps=1", "trainer.progress=false",
            "grads.log_every_n_steps=1", "grads.figure_every_n_steps=0")
    straight = tmp_path / "straight"
    train(make_cfg(*args, "trainer.max_steps=7", "data.num_workers=0", tiny=False), run_dir=straight)
    first = tmp_path / "first"
    train(make_cfg(*args, "trainer.max_steps=2", "data.num_workers=0", tiny=False), run_dir=first)
    assert load_checkpoint(first / "checkpoints" / "last.pt")["state"]["batch_in_epoch"] == 2  # of 4
    resumed = tmp_path / "resumed"
    train(make_cfg(*args, "trainer.max_steps=7", "data.num_workers=2",
                   f"trainer.resume={first / 'checkpoints' / 'last.pt'}", tiny=False), run_dir=resumed)
    tags, reference = scalar_tags(resumed), scalar_tags(straight)
    assert [s for s, _ in tags["train/loss"]] == [3, 4, 5, 6, 7]
    assert [v for _, v in tags["train/loss"]] == pytest.approx([v for _, v in reference["train/loss"][2:]],
                                                               rel=1e-5)
    assert [v for _, v in tags["grad_norm/layer1"]] == pytest.approx(
        [v for _, v in reference["grad_norm/layer1"][2:]], rel=1e-4)


def test_a_run_shorter_than_its_warmup_writes_strict_json_and_says_what_is_missing(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    train(make_cfg("trainer.max_steps=2", "trainer.warmup_steps_excluded=5", "grads.log_every_n_steps=10",
                   "trainer.resume=auto"), run_dir=tmp_path)
    out = capsys.readouterr().out

    def strict(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    metrics = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=strict)
    assert metrics["images_per_sec"] is None and metrics["steps"] == 2
    assert f"trainer.resume=auto found no checkpoint in {tmp_path}; starting at step 0." in out
    assert "images/s not measured (trainer.warmup_steps_excluded=5 steps are untimed)" in out
    assert "no gradient statistics were logged: the run ended before step grads.log_every_n_steps=10." in out
