"""Bad input, non-finite values, interrupts, truncated checkpoints, reproducibility."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch

import capsexp.engine.assembly as assembly
from capsexp.rundir.checkpoint import FORMAT, load_checkpoint, save_checkpoint
from capsexp.engine.loop import StopTraining
from capsexp.errors import UserError
from capsexp.train import train
from conftest import TINY, make_cfg, run_cli, start_cli

TIMING_KEYS = {"images_per_sec"}  # wall-clock numbers: the only keys allowed to differ between runs


def _same_metrics(a: dict, b: dict) -> None:
    assert {k: v for k, v in a.items() if k not in TIMING_KEYS} == \
        {k: v for k, v in b.items() if k not in TIMING_KEYS}


def _bad_inputs(tmp: Path) -> list[tuple[list[str], str]]:
    garbage = tmp / "garbage.pt"
    garbage.write_bytes(b"this is not a tensor file")
    wrong = tmp / "wrong.pt"
    torch.save({"conv1.weight": torch.zeros(2, 2)}, wrong)
    foreign = tmp / "capsule_ckpt.pt"
    torch.save({"format": FORMAT, "config": {"head": {"name": "capsule"}, "adapter": {"name": "none"}},
                "num_classes": 8}, foreign)
    (tmp / "empty").mkdir()
    (tmp / "one" / "cats").mkdir(parents=True)
    for i in range(2):
        from PIL import Image
        Image.new("RGB", (8, 8)).save(tmp / "one" / "cats" / f"{i}.png")
    return [
        (["head=transformer"], "head"),
        (["adapter=big"], "adapter"),
        (["backbone.freeze_depth=6"], "backbone.freeze_depth"),
        (["backbone.freeze_depth=-1"], "backbone.freeze_depth"),
        (["head=capsule", "head.routing.iterations=0"], "head.routing.iterations"),
        (["data.batch_size=0"], "data.batch_size"),
        (["optim.lr=0"], "optim.lr"),
        (["optim.lr=-0.1"], "optim.lr"),
        (["trainer.max_epochs=0"], "trainer.max_epochs"),
        (["trainer.max_epochs=abc"], "trainer.max_epochs"),
        (["data.image_size=0"], "data.image_size"),
        (["data.image_size=16"], "data.image_size"),
        (["head=capsule", "head.primary.types=0"], "head.primary.types"),
        (["adapter=conv", "adapter.width=0"], "adapter.width"),
        ([f"backbone.weights={garbage}"], "backbone.weights"),
        ([f"backbone.weights={wrong}"], "backbone.weights"),
        ([f"backbone.weights={tmp / 'missing.pt'}"], "backbone.weights"),
        ([f"trainer.resume={foreign}"], "trainer.resume"),
        (["data=imagefolder", f"data.root={tmp / 'nowhere'}"], "data.root"),
        (["data=imagefolder", f"data.root={tmp / 'empty'}"], "data.root"),
        (["data=imagefolder", f"data.root={tmp / 'one'}"], "data.root"),
        (["trainer.on_nonfinite=ignore"], "trainer.on_nonfinite"),
    ]


@pytest.mark.slow
def test_every_bad_input_is_one_sentence_naming_the_key(tmp_path: Path) -> None:
    failures = []
    for index, (overrides, key) in enumerate(_bad_inputs(tmp_path)):
        run_dir = tmp_path / f"run{index}"
        tiny = [a for a in TINY if not a.startswith(("data.train_size", "data.val_size"))] \
            if "data=imagefolder" in overrides else TINY  # those keys exist for shapes only
        proc = run_cli("train", *tiny, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=180)
        err = proc.stderr
        ok = proc.returncode != 0 and "Traceback" not in err and key in err \
            and not list(run_dir.rglob("*.pt"))
        if not ok:
            failures.append((overrides, proc.returncode, err[-600:]))
    assert not failures, failures


@pytest.mark.slow
def test_capsexp_errors_print_one_line(tmp_path: Path) -> None:
    proc = run_cli("train", "backbone.freeze_depth=9", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2
    assert lines == ["capsexp: error: backbone.freeze_depth=9 is not allowed; it must be an integer from 0 to 5."]


def _poison(monkeypatch: pytest.MonkeyPatch, at_step: int) -> None:
    """Make layer2's gradients NaN at one optimizer step (counted from 1)."""
    real = assembly.build_model

    def build(cfg, num_classes):  # type: ignore[no-untyped-def]
        model = real(cfg, num_classes)
        calls = {"n": 0}

        def hook(grad: torch.Tensor) -> torch.Tensor:
            calls["n"] += 1
            return grad * float("nan") if calls["n"] == at_step else grad

        model.backbone.layer2[0].conv1.weight.register_hook(hook)
        return model

    monkeypatch.setattr(assembly, "build_model", build)


def test_nan_gradient_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _poison(monkeypatch, at_step=3)
    cfg = make_cfg("data.train_size=16", "trainer.max_epochs=3", "trainer.max_steps=6")
    with pytest.raises(StopTraining, match=r"step 3; first stage with non-finite gradients: layer2") as info:
        train(cfg, run_dir=tmp_path)
    assert info.value.exit_code != 0
    kept = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert kept["state"]["step"] == 2  # the end of epoch 1, before the bad step
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())
    assert json.loads((tmp_path / "metrics.json").read_text())["status"] == "failed"


def test_nan_gradient_with_skip_skips_and_counts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_train import scalar_tags

    import capsexp.engine.step as engine

    _poison(monkeypatch, at_step=3)
    losses: list[float] = []
    real_step = engine.train_step

    def step(*args: object) -> tuple:
        out = real_step(*args)
        losses.append(float(out[0]))
        return out

    monkeypatch.setattr(engine, "train_step", step)
    # steps 3 (poisoned) and 4 share one logging window
    cfg = make_cfg("data.train_size=32", "trainer.max_epochs=2", "trainer.max_steps=6",
                   "trainer.on_nonfinite=skip", "trainer.log_every_n_steps=2")
    metrics = train(cfg, run_dir=tmp_path)
    assert metrics["skipped_steps"] == 1 and metrics["status"] == "completed"
    tags = scalar_tags(tmp_path)
    assert tags["train/skipped_steps"] == [(3, 1.0)]
    # the skipped step counts for nothing in the logged average: it is step 4's loss alone
    assert losses[2] == 0.0 and dict(tags["train/loss"])[4] == pytest.approx(losses[3], rel=1e-6)
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert all(torch.isfinite(v).all() for v in last["model"].values() if v.is_floating_point())


def test_truncated_checkpoint_is_reported_clearly(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(cut)


@pytest.mark.slow
def test_truncated_checkpoint_is_reported_clearly_by_the_command(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    save_checkpoint({"model": {"w": torch.randn(1000)}}, good)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(good.read_bytes()[:500])
    proc = run_cli("train", *TINY, f"trainer.resume={cut}", f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "trainer.resume" in proc.stderr and "truncated" in proc.stderr


def test_a_kill_while_writing_leaves_the_previous_checkpoint(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint({"step": 1}, path)

    def dies_half_way(obj: object, handle) -> None:  # type: ignore[no-untyped-def]
        handle.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind


@pytest.mark.slow
def test_two_identical_seeded_runs_give_identical_metrics(tmp_path: Path) -> None:
    cfg = make_cfg("head=capsule", "adapter=conv", "adapter.width=32", "trainer.max_steps=3")
    _same_metrics(train(cfg, run_dir=tmp_path / "a"), train(cfg, run_dir=tmp_path / "b"))


@pytest.mark.slow
def test_sigint_checkpoints_and_the_resumed_run_ends_like_an_uninterrupted_one(tmp_path: Path) -> None:
    from test_train import scalar_tags

    args = [*TINY, "data.train_size=128", "trainer.max_steps=16", "trainer.max_epochs=2",
            "data.val_size=16"]
    straight = run_cli("train", *args, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path)
    assert straight.returncode == 0, straight.stderr[-2000:]

    run_dir = tmp_path / "interrupted"
    # on one thread, as run_cli runs the other two: the same arithmetic, the same metrics
    proc = start_cli("train", *args, f"hydra.run.dir={run_dir}", cwd=tmp_path, new_session=False)
    deadline = time.time() + 300
    # interrupt once training has logged its second step (the loop owns SIGINT by then)
    while time.time() < deadline and proc.poll() is None:
        if list(run_dir.glob("events.out.tfevents.*")) and len(scalar_tags(run_dir).get("train/loss", [])) >= 2:
            break
        time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "checkpoint saved" in err
    saved = load_checkpoint(run_dir / "checkpoints" / "last.pt")
    assert 0 < saved["state"]["step"] < 16

    resumed = run_cli("train", *args, f"hydra.run.dir={run_dir}", "trainer.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed at step {saved['state']['step']}" in resumed.stdout
    _same_metrics(json.loads((run_dir / "metrics.json").read_text()),
                  json.loads((tmp_path / "straight" / "metrics.json").read_text()))


HYDRA_LEVEL_MISTAKES = [
    (["head=capsul"], "head=capsul is not an option of head; choose from capsule, fc."),
    (["trainer.max_step=5"], "trainer.max_step is not a key of this configuration; did you mean trainer.max_steps?"),
    (["head.routing.iterations=5"], "head.routing.iterations is not a key of this configuration; it exists "
                                    "only with head=capsule"),
    (["trainer.max_steps=1,3"], "trainer.max_steps=1,3 gives several values; add -m to run one job per value, "
                                "e.g. capsexp train -m trainer.max_steps=1,3"),
    (["data.image_size=[32"], "'data.image_size=[32' is not a valid override"),
    (["data=imagefolder"], "data.root is required for data=imagefolder; pass data.root=/path/to/images."),
    (["experiment=seed_scenario"], "experiment=seed_scenario needs a trained backbone: pass backbone.weights="),
    (["-m", "experiment=routing_sweep", "head=fc"], "in the job with head.routing.iterations=1, "
     "head.routing.detach=true: head.routing.iterations is not a key of this configuration; it exists only "
     "with head=capsule"),
    (["-m", "backbone.freeze_depth=0,9"], "in the job with backbone.freeze_depth=9: backbone.freeze_depth=9 is "
                                          "not allowed; it must be an integer from 0 to 5."),
    (["-m", "head=fc,capsule", "adapter=conv,bad"], "in the job with head=fc, adapter=bad: adapter=bad is not an "
                                                    "option of adapter; choose from conv, linear, none, pool."),
    (["-m", "head=glob(cap*)", "head.routing.detach=true,false", "head.routing.iterations=0"],
     "head.routing.iterations is not a key of this configuration; it exists only with head=capsule"),
    (["-m", "head=glob(cap*)", "head.routing.iterations=0,2"], "in the job with head=capsule, "
                                                               "head.routing.iterations=0: "
                                                               "head.routing.iterations=0 is not allowed"),
    # as Hydra does, the config of the overrides that are not swept must compose on its own
    (["hydra.mode=MULTIRUN", "head=fc,capsule", "head.routing.iterations=3"],
     "head.routing.iterations is not a key of this configuration; it exists only with head=capsule"),
]


# two cases (a group option, a job of a sweep) in the quick suite; each further case is another process start
QUICK_MISTAKES = (0, 8)


@pytest.mark.parametrize("args, message", [
    case if index in QUICK_MISTAKES else pytest.param(*case, marks=pytest.mark.slow)
    for index, case in enumerate(HYDRA_LEVEL_MISTAKES)])
def test_composition_mistakes_are_one_sentence_before_anything_is_written(args: list[str], message: str,
                                                                          tmp_path: Path) -> None:
    proc = run_cli("train", *args, f"hydra.run.dir={tmp_path / 'run'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                   cwd=tmp_path, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith(f"capsexp: error: {message}"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no sweep folder, no job


def test_refused_rerun_leaves_the_existing_run_record_alone(tmp_path: Path) -> None:
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "metrics.json").write_text("{}\n")
    (run / "environment.json").write_text('{"capsexp": "0.1.0"}\n')  # a run folder capsexp made
    record = run / ".hydra" / "overrides.yaml"
    record.write_text("- seed=0\n")
    proc = run_cli("train", "seed=7", f"hydra.run.dir={run}", cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert record.read_text() == "- seed=0\n"
    assert sorted(p.name for p in run.iterdir()) == [".hydra", "environment.json", "metrics.json"]


@pytest.mark.parametrize("override, message", [
    ("optim.min_lr_ratio=-3", "optim.min_lr_ratio=-3 is not allowed; it must be a number in [0, 1]"),
    ("optim.betas=[2,3]", "optim.betas=[2, 3] is not allowed; it must be a list of two numbers in [0, 1)"),
    ("grads.alarm.early_stages=stem", "grads.alarm.early_stages='stem' is not allowed; it must be a non-empty list"),
    ("grads.alarm.early_stages=[layer9]", "grads.alarm.early_stages=['layer9'] is not allowed"),
    ("grads.alarm.early_stages=[head]", "grads.alarm.early_stages=['head'] is not allowed"),
    ("data.download=maybe", "data.download='maybe' is not allowed; it must be true or false."),
])
def test_more_values_checked_before_training(override: str, message: str) -> None:
    from capsexp.config.validation import validate

    with pytest.raises(UserError) as caught:
        validate(make_cfg(override))
    assert str(caught.value).startswith(message)


def test_flags_may_follow_overrides_and_conflicting_modes_are_one_sentence() -> None:
    from capsexp.config.argv import hydra_argv

    assert hydra_argv(["head=capsule", "-m", "head.routing.iterations=1,3", "--info", "defaults", "seed=1"]) == \
        ["-m", "--info", "defaults", "head=capsule", "head.routing.iterations=1,3", "seed=1"]
    assert hydra_argv(["-cn", "other", "--cfg", "job", "a=1"]) == ["-cn", "other", "--cfg", "job", "a=1"]


@pytest.mark.slow
def test_flags_may_follow_overrides_and_conflicting_modes_are_one_sentence_in_the_command(tmp_path: Path) -> None:
    shown = run_cli("train", "head=capsule", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert shown.returncode == 0 and "name: capsule" in shown.stdout
    both = run_cli("train", "-m", "head=fc,capsule", "--cfg", "job", cwd=tmp_path, timeout=120)
    assert both.returncode == 2 and both.stderr.strip() == (
        "capsexp: error: --cfg and -m cannot be combined; Hydra runs one of -m, --cfg, --info, --run and "
        "--shell-completion per command.")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [
    ["-m", "experiment=routing_sweep,freeze_sweep"],  # a swept preset brings no preset sweep of its own
    ["-m", "experiment=fc_vs_capsule", "hydra.sweeper.params.head=fc", "loss.label_smoothing=0.1"],
    ["data=imagefolder", "data.root=${hydra:runtime.cwd}/images"],  # resolved inside the job only
    ["seed=${oc.env:CAPSEXP_TEST_UNSET_VARIABLE}"],  # set by a launcher inside the job
    ["head=capsule", "--info"],
])
def test_what_only_the_job_can_resolve_is_not_refused(args: list[str], tmp_path: Path) -> None:
    from capsexp.config.argv import hydra_argv
    from capsexp.config.overrides import check_command_line

    check_command_line("train", args)  # no UserError
    if "--info" in args:
        assert hydra_argv(args) == ["--info", "all", "head=capsule"]
