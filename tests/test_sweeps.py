"""Sweeps: job folders named by what is swept, experiment and launcher presets, HParams per run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from capsexp.config.validation import resolve_default_loss, validate
from capsexp.config.naming import MAX_SUBDIR_CHARS, sweep_subdir, swept_keys
from conftest import TINY, run_cli

# conftest's tiny run, with 2 batches per epoch so that 4 steps give two validations
SWEEP_TINY = [o for o in TINY if not o.startswith(("data.train_size=", "trainer.max_epochs=",
                                                      "grads.figure_every_n_steps="))] + [
    "data.train_size=16", "data.val_size=8", "trainer.max_epochs=2", "grads.figure_every_n_steps=0"]

PRESETS = {
    "fc_vs_capsule": {"head": "fc,capsule", "adapter": "none,conv,linear"},
    "routing_sweep": {"head.routing.iterations": "range(1,6)", "head.routing.detach": "true,false"},
    "freeze_sweep": {"backbone.freeze_depth": "range(0,6)", "head": "fc,capsule"},
    "seed_scenario": {"adapter": "none,conv"},
}
GRID_SIZES = {"fc_vs_capsule": 6, "routing_sweep": 10, "freeze_sweep": 12, "seed_scenario": 2}


def tiny_sweep(base: Path) -> tuple[Path, subprocess.CompletedProcess | None]:
    """``capsexp train -m head=fc,capsule`` once per test session (test_report.py reads it too)."""
    sweep = base / "tiny_sweep"
    if (sweep / ".complete").exists():
        return sweep, None
    proc = run_cli("train", "-m", "head=fc,capsule", *SWEEP_TINY, f"hydra.sweep.dir={sweep}", cwd=base,
                   env={"XDG_CACHE_HOME": str(base / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (sweep / ".complete").touch()
    return sweep, proc


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess | None]:
    return tiny_sweep(tmp_path_factory.getbasetemp())


def compose_hydra(*overrides: str) -> DictConfig:
    """The composed config with its ``hydra`` node (sweeper params, launcher), tiny settings first."""
    with initialize_config_module(config_module="capsexp.conf", version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides], return_hydra_config=True)


# ---------------------------------------------------------------- folder names

def test_only_swept_keys_name_the_folder() -> None:
    command_line = ["-m", "head=fc,capsule", "data.image_size=32", "--cfg", "job", "seed=range(0,2)",
                    "hydra.sweep.dir=x", "hydra/launcher=local_parallel", "trainer.resume=auto"]
    assert swept_keys(command_line, None) == ["head", "seed"]
    params = {"head.routing.iterations": "range(1,6)", "adapter": "none", "head.routing.detach": "true,false"}
    assert swept_keys(["head.routing.detach=true"], params) == ["head.routing.iterations"]  # pinned
    assert swept_keys(["x=choice(1,2)", "y=glob(*)", "z=interval(0,1)", "w=3"], {}) == ["x", "y", "z"]


def test_folder_name_is_stable_safe_and_unique() -> None:
    job = ["data.image_size=32", "head=capsule", "head.routing.iterations=3"]
    assert sweep_subdir(job, ["head", "head.routing.iterations"], 3) == "03_head=capsule,head.routing.iterations=3"
    assert sweep_subdir(job, [], 7) == "07"  # nothing swept: the job number alone
    weights = sweep_subdir(["backbone.weights=/runs/a/best.pt"], ["backbone.weights"], 1)
    assert weights == "01_backbone.weights=_runs_a_best.pt"  # a '/' must not make subfolders
    long = sweep_subdir([f"a={'x' * 400}"], ["a"], 12)
    assert long.startswith("12_a=") and len(long) == len("12_") + MAX_SUBDIR_CHARS
    same = [sweep_subdir(["seed=1"], ["seed"], n) for n in (0, 1)]  # a value repeated in a sweep
    assert same[0] != same[1]


def test_multirun_names_each_job_by_what_differs(sweep: tuple[Path, subprocess.CompletedProcess | None]) -> None:
    sweep_dir, _ = sweep
    jobs = sorted(p.name for p in sweep_dir.iterdir() if p.is_dir())
    assert jobs == ["00_head=fc", "01_head=capsule"]
    for job in jobs:
        assert list((sweep_dir / job).glob("events.out.tfevents.*")) and (sweep_dir / job / "metrics.json").is_file()
        assert (sweep_dir / job / ".hydra" / "overrides.yaml").is_file()


def test_hparams_live_in_the_runs_own_event_file(sweep: tuple[Path, subprocess.CompletedProcess | None]) -> None:
    run = sweep[0] / "00_head=fc"
    assert [p for p in run.rglob("events.out.tfevents.*") if p.parent != run] == []  # no extra sub-run for HParams
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert {"_hparams_/experiment", "_hparams_/session_start_info",
            "_hparams_/session_end_info"} <= set(acc.PluginTagToContent("hparams"))
    assert "summary/best/val/acc" in acc.Tags()["scalars"] and "grad_norm/layer1" in acc.Tags()["scalars"]


def test_hydra_flags_still_work(tmp_path: Path) -> None:
    helped = run_cli("train", "--help", cwd=tmp_path)
    assert helped.returncode == 0 and "experiment: fc_vs_capsule, freeze_sweep" in helped.stdout
    assert "Config groups (one option each, e.g. head=capsule):" in helped.stdout and "head: capsule, fc" in helped.stdout
    assert "capsexp train -m head=capsule head.routing.iterations=1,3,5" in helped.stdout  # the examples
    shown = run_cli("train", "--cfg", "job", "experiment=routing_sweep", cwd=tmp_path)
    assert shown.returncode == 0 and "iterations: 3" in shown.stdout and "name: capsule" in shown.stdout
    assert not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- presets

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_experiment_preset_sweeps_what_it_documents(name: str) -> None:
    cfg = compose_hydra(f"experiment={name}")
    params = OmegaConf.to_container(cfg.hydra.sweeper.params)
    assert params == PRESETS[name]
    parser = OverridesParser.create()
    overrides = parser.parse_overrides([f"{k}={v}" for k, v in params.items()])
    grid = [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]
    assert len(grid) == GRID_SIZES[name]
    for job in grid:  # every job of the grid composes and passes validation
        # the presets are about the seed's ResNet50 (its weights name is resnet50's)
        job_cfg = compose_hydra(f"experiment={name}", "backbone=resnet50", "backbone.weights=IMAGENET1K_V2", *job)
        validate(job_cfg)  # resolves loss=default: the capsule head's routing's own loss
        assert job_cfg.loss.name == ("margin" if job_cfg.head.name == "capsule" else "ce")
    # and the command-line check, which composes the preset's sweep itself, lets it through
    from capsexp.config.overrides import check_command_line

    check_command_line("train", ["-m", f"experiment={name}", "backbone=resnet50", "backbone.weights=IMAGENET1K_V2",
                                 "data.image_size=32"])


def test_capsule_presets_keep_the_capsule_default_loss_unless_given() -> None:
    routing_sweep = compose_hydra("experiment=routing_sweep")
    assert routing_sweep.loss.name == "default"  # the capsule head's own: its routing's loss, resolved by validate
    resolve_default_loss(routing_sweep)
    assert routing_sweep.loss.name == "margin"
    em = compose_hydra("experiment=routing_sweep", "head.routing.name=em")
    resolve_default_loss(em)
    assert em.loss.name == "spread" and em.loss.m_start == 0.2
    assert compose_hydra("experiment=routing_sweep", "loss=ce").loss.name == "ce"
    assert compose_hydra("experiment=fc_vs_capsule", "head=capsule", "loss=spread").loss.name == "spread"


def test_seed_scenario_requires_backbone_weights() -> None:
    cfg = compose_hydra("experiment=seed_scenario")
    with pytest.raises(Exception, match="backbone.weights="):
        OmegaConf.to_container(cfg.backbone, resolve=True)
    given = compose_hydra("experiment=seed_scenario", "backbone.weights=run/checkpoints/best.pt")
    assert given.backbone.weights == "run/checkpoints/best.pt" and given.head.name == "capsule"


@pytest.mark.slow
def test_seed_scenario_without_backbone_weights_is_one_sentence_from_the_command(tmp_path: Path) -> None:
    proc = run_cli("train", "experiment=seed_scenario", *TINY, f"hydra.run.dir={tmp_path / 'run'}",
                   cwd=tmp_path, env={"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert proc.returncode == 2 and "capsexp: error: experiment=seed_scenario needs" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("launcher,target,settings", [
    ("local_parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", {"n_jobs": 2}),
    ("slurm", "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
     {"gpus_per_node": 1, "tasks_per_node": 1, "timeout_min": 120, "partition": None}),
])
def test_launcher_presets_compose(launcher: str, target: str, settings: dict) -> None:
    cfg = compose_hydra(f"hydra/launcher={launcher}", "experiment=fc_vs_capsule")
    assert cfg.hydra.launcher._target_ == target
    for key, value in settings.items():
        assert cfg.hydra.launcher[key] == value
    subdir = OmegaConf.to_container(cfg.hydra.sweep)["subdir"]  # unresolved: job.num is set per job
    assert subdir.startswith("${capsexp_sweep_subdir:")  # the launcher keeps the folder names
