"""Resume continues the same run: what changes its meaning is refused, what may change is applied
(and config.yaml says so), and a complete run is left alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.rundir.resume import CONTINUABLE, changed_keys
from capsexp.train import train
from conftest import TINY, make_cfg, run_cli

# two steps per epoch, resnet18 for speed
ARGS = [*TINY, "backbone=resnet18", "data.train_size=16", "trainer.max_steps=null", "grads.figure_every_n_steps=0"]


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a run folder, with its content and modification time."""
    return {str(p.relative_to(run)): (p.read_bytes(), p.stat().st_mtime_ns) for p in run.rglob("*") if p.is_file()}


@pytest.fixture()
def mid_epoch_run(tmp_path: Path) -> Path:
    """A run stopped after step 1 of a 2-step epoch (trainer.max_steps=1)."""
    run = tmp_path / "run"
    train(make_cfg(*ARGS[len(TINY):], "trainer.max_epochs=2", "trainer.max_steps=1"), run_dir=run)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["batch_in_epoch"] == 1
    return run


def test_a_changed_meaning_is_refused_in_one_sentence_and_nothing_changes(mid_epoch_run: Path) -> None:
    run = mid_epoch_run
    before = _snapshot(run)
    proc = run_cli("train", *ARGS, "trainer.max_epochs=2", "trainer.max_steps=4", "trainer.resume=auto",
                   "optim.lr=0.01", "data.batch_size=4", f"hydra.run.dir={run}", cwd=run.parent, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and lines == [
        "capsexp: error: trainer.resume: this run was made with data.batch_size=8, optim.lr=0.001; the resumed "
        "run asks for data.batch_size=4, optim.lr=0.01. Resume continues the same run: drop those overrides, "
        "or start a new run."], proc.stderr[-2000:]
    assert _snapshot(run) == before  # config.yaml, metrics.json, checkpoints, and Hydra's .hydra/ record


def test_a_changed_option_is_named_once(mid_epoch_run: Path) -> None:
    old = load_checkpoint(mid_epoch_run / "checkpoints" / "last.pt")["config"]
    cfg = make_cfg(*ARGS[len(TINY):], "head=capsule", "seed=3", "trainer.max_epochs=9", "data.num_workers=1")
    # the head's default loss comes with it; the head's own sub-keys (head.routing.*) are not listed
    assert sorted(changed_keys(old, cfg)) == [("head.name", "fc", "capsule"), ("loss.name", "ce", "margin"), ("seed", 0, 3)]


@pytest.mark.slow
def test_what_may_change_is_applied_and_config_yaml_says_so(mid_epoch_run: Path) -> None:
    run = mid_epoch_run
    proc = run_cli("train", *ARGS, "trainer.max_epochs=2", "trainer.max_steps=3", "trainer.resume=auto",
                   "data.num_workers=1", "trainer.checkpoints=last+best", "trainer.log_every_n_steps=2",
                   f"hydra.run.dir={run}", cwd=run.parent, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed at step 1" in proc.stdout
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["steps"] == 3 and metrics["status"] == "completed"
    written = OmegaConf.load(run / "config.yaml")
    assert (written.trainer.max_steps, written.data.num_workers, written.trainer.checkpoints) == (3, 1, "last+best")
    assert (run / "checkpoints" / "best.pt").exists()


@pytest.mark.slow
def test_resume_auto_into_a_complete_run_changes_nothing_unless_it_is_extended(tmp_path: Path) -> None:
    run = tmp_path / "run"
    done = run_cli("train", *ARGS, "trainer.max_epochs=1", f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    before = _snapshot(run)
    again = run_cli("train", *ARGS, "trainer.max_epochs=1", "trainer.resume=auto", f"hydra.run.dir={run}",
                    cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and again.stderr == "", again.stderr[-2000:]
    assert again.stdout.splitlines() == [
        f"capsexp: the run in '{run}' is complete at step 2, epoch 1 (trainer.max_steps=null, trainer.max_epochs=1); "
        "nothing was changed. Raise trainer.max_epochs or trainer.max_steps to extend it."]
    assert _snapshot(run) == before
    extended = run_cli("train", *ARGS, "trainer.max_epochs=2", "trainer.resume=auto", f"hydra.run.dir={run}",
                       cwd=tmp_path, timeout=300)
    assert extended.returncode == 0 and "resumed at step 2" in extended.stdout, extended.stderr[-2000:]
    assert json.loads((run / "metrics.json").read_text())["steps"] == 4
    assert OmegaConf.load(run / "config.yaml").trainer.max_epochs == 2


def test_a_complete_run_without_checkpoints_is_left_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(make_cfg(*ARGS[len(TINY):], "trainer.max_epochs=1", "trainer.checkpoints=none"), run_dir=run)
    before = _snapshot(run)
    metrics = train(make_cfg(*ARGS[len(TINY):], "trainer.max_epochs=2", "trainer.checkpoints=none",
                             "trainer.resume=auto"), run_dir=run)
    assert metrics["status"] == "completed" and _snapshot(run) == before


@pytest.mark.slow
def test_a_resume_from_elsewhere_never_overwrites_another_run(mid_epoch_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    train(make_cfg(*ARGS[len(TINY):], "trainer.max_epochs=1", "trainer.checkpoints=none"), run_dir=other)
    before = _snapshot(other)
    proc = run_cli("train", *ARGS, "trainer.max_epochs=2", f"trainer.resume={mid_epoch_run / 'checkpoints' / 'last.pt'}",
                   f"hydra.run.dir={other}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "already holds another run" in proc.stderr and "Traceback" not in proc.stderr
    assert _snapshot(other) == before


def test_the_rule_is_declared_once() -> None:
    assert "trainer.max_epochs" in CONTINUABLE and "data.num_workers" in CONTINUABLE
    for meaning in ("optim", "data.batch_size", "seed", "head", "loss", "trainer.grad_clip"):
        assert not any(k == meaning or k.startswith(meaning + ".") for k in CONTINUABLE)
