"""What a user sees of a run: its folder and TensorBoard run name, its checkpoints, progress lines
without a terminal, and how ``capsexp report`` labels runs and weighs their accuracy against chance."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

import capsexp.cli  # noqa: F401 -- registers the folder-name resolvers, as the command does
from capsexp.engine.console import format_duration, progress_line
from capsexp.report import build_rows, find_runs, read_run, report_figure
from capsexp.train import train
from conftest import TINY, cli_env, make_cfg, run_cli
from test_sweeps import tiny_sweep

# conftest's tiny run with 3 batches per epoch over 2 epochs, stopped at step 4: the first epoch
# ends between two lines of progress_every_n_steps=2
RUN = [o for o in TINY if not o.startswith(("data.train_size=", "trainer.max_epochs=", "trainer.progress=",
                                            "grads.figure_every_n_steps="))] + [
    "data.train_size=24", "trainer.max_epochs=2", "grads.figure_every_n_steps=0",
    "trainer.progress=auto", "trainer.progress_every_n_steps=2"]
LINE = re.compile(r"capsexp: step (\d+)/4 \(epoch (\d)/2\) loss \d+\.\d{3}, (\d+\.\d|-) images/s, "
                  r"ETA (\d+s|\d+m\d\ds|\d+h\d\dm|-)")
EVENTS = "events.out.tfevents.*"


@pytest.fixture(scope="module")
def named_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """``capsexp train head=capsule adapter=conv ...`` in a fresh folder, without hydra.run.dir;
    stderr is a pipe, not a terminal."""
    base = tmp_path_factory.getbasetemp()
    cwd = tmp_path_factory.mktemp("named")
    proc = run_cli("train", *RUN, "head=capsule", "adapter=conv", "adapter.width=32", "trainer.limit_val_batches=1",
                   cwd=cwd, env={"XDG_CACHE_HOME": str(base / "cache")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = (cwd / "outputs" / "runs").glob("*/*")
    return folder, proc


def label_of(*overrides: str) -> str:
    """The label the composed config gives a single run's folder (after ``<time>_``)."""
    with initialize_config_module(config_module="capsexp.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides), return_hydra_config=True)
    return Path(cfg.hydra.run.dir).name.split("_", 1)[1]


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["folder"]: row for row in csv.DictReader(handle)}


# ---------------------------------------------------------------- run folders and TensorBoard

def test_a_run_folder_says_what_the_run_is(named_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    folder, proc = named_run
    assert re.fullmatch(r"\d\d-\d\d-\d\d-\d{6}_capsule-conv-r3-resnet18", folder.name), folder.name  # resnet18: the tests' backbone
    assert f"new run in outputs/runs/{folder.parent.name}/{folder.name}\n" in proc.stdout
    assert list(folder.glob(EVENTS)) and not (folder / "tb").exists()


def test_the_tensorboard_run_is_the_run_folder(named_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    folder, _ = named_run
    mux = EventMultiplexer().AddRunsFromDirectory(str(folder.parents[2]))
    mux.Reload()
    # .hydra/ and checkpoints/ hold no event files, so they are no runs of their own
    assert list(mux.Runs()) == [f"runs/{folder.parent.name}/{folder.name}"]
    assert "train/loss" in mux.PluginRunToTagToContent("scalars")[f"runs/{folder.parent.name}/{folder.name}"]


@pytest.mark.parametrize(("overrides", "label"), [
    ((), "fc-none"),
    (("head=capsule", "adapter=conv"), "capsule-conv-r3"),
    (("experiment=routing_sweep",), "capsule-none-r3"),  # the preset's margin loss is the capsule default
    (("head=capsule", "adapter=conv", "head.routing.iterations=1", "optim=sgd", "backbone.freeze_depth=2",
      "backbone=resnet18"), "capsule-conv-r1-sgd-freeze2-resnet18"),
    (("head=capsule", "loss=ce"), "capsule-none-r3-ce"),
    (("loss=margin", "data=cifar10", "adapter=linear"), "fc-linear-margin-cifar10"),
    (("head=capsule", "name=baseline.v2"), "baseline.v2"),
])
def test_folder_labels(overrides: tuple[str, ...], label: str) -> None:
    assert label_of(*overrides) == label


@pytest.mark.slow
def test_a_label_that_is_no_file_name_is_refused(tmp_path: Path) -> None:
    proc = run_cli("train", "name=../up", cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("capsexp: error: name='../up' is not allowed; it must be null or a label")
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "outputs").exists()


# ---------------------------------------------------------------- checkpoints

@pytest.mark.parametrize(("policy", "files"), [("none", []), ("last", ["last.pt"]),
                                               ("last+best", ["best.pt", "last.pt"])])
def test_trainer_checkpoints_keeps_what_it_says(policy: str, files: list[str], tmp_path: Path,
                                                one_thread: None) -> None:
    train(make_cfg(f"trainer.checkpoints={policy}", "trainer.max_steps=2", "grads.figure_every_n_steps=0"),
          run_dir=tmp_path)
    assert (tmp_path / "metrics.json").is_file()
    kept = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.suffix == ".pt"
                  or p.parent.name == "checkpoints")
    assert kept == [f"checkpoints/{name}" for name in files]  # and no temporary file beside them


@pytest.mark.slow
def test_an_interrupted_run_without_checkpoints_says_it_cannot_be_resumed(tmp_path: Path) -> None:
    args = [o for o in TINY if not o.startswith(("trainer.progress=", "trainer.max_steps=",
                                                  "grads.figure_every_n_steps="))]
    cmd = [sys.executable, "-m", "capsexp", "train", *args, "trainer.max_steps=6", "trainer.progress=auto",
           "trainer.progress_every_n_steps=1", "trainer.checkpoints=none", "grads.figure_every_n_steps=0", f"hydra.run.dir={tmp_path / 'run'}"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    for line in proc.stderr:  # the loop owns SIGINT once a step has been trained
        if line.startswith("capsexp: step 2/6"):
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait(timeout=300) == 130, rest[-2000:]
    assert "trainer.checkpoints=none, so nothing was saved and this run cannot be resumed" in rest
    assert "checkpoint saved" not in rest and not list((tmp_path / "run").rglob("*.pt"))


# ---------------------------------------------------------------- progress lines

def test_without_a_terminal_progress_is_a_line_every_n_steps_and_per_epoch(
        named_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    _, proc = named_run
    lines = [line for line in proc.stderr.splitlines() if line.startswith("capsexp: step ")]
    parsed = [LINE.fullmatch(line) for line in lines]
    assert all(parsed), lines
    # every 2 steps, and the end of epoch 1 at step 3; step 4 ends both the run and epoch 2
    assert [(int(m[1]), int(m[2])) for m in parsed] == [(2, 1), (3, 1), (4, 2)]
    assert parsed[-1][4] == "0s" and "\r" not in proc.stderr  # no progress bar drawn


@pytest.mark.parametrize(("seconds", "shown"), [(0, "0s"), (59.4, "59s"), (59.6, "1m00s"), (252, "4m12s"),
                                                (3600, "1h00m"), (3 * 3600 + 7 * 60 + 59, "3h07m"),
                                                (float("nan"), "-")])
def test_eta_is_short_and_readable(seconds: float, shown: str) -> None:
    assert format_duration(seconds) == shown


def test_the_progress_line() -> None:
    assert progress_line(120, 500, 1, 4, 1.2341, 85.23, 252) == \
        "capsexp: step 120/500 (epoch 1/4) loss 1.234, 85.2 images/s, ETA 4m12s"
    assert progress_line(1, 500, 1, 4, float("nan"), float("nan"), float("nan")) == \
        "capsexp: step 1/500 (epoch 1/4) loss -, - images/s, ETA -"


# ---------------------------------------------------------------- the report

def hand_made_run(folder: Path, steps: int, best: float, val_images: int) -> None:
    """A finished run as the CLI leaves it, with the accuracy given."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"trainer.max_steps={steps}"]))
    (folder / "config.yaml").write_text(yaml.safe_dump({"head": {"name": "fc"}, "data": {"name": "shapes"},
                                                        "trainer": {"max_steps": steps}}))
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "steps": steps, "val/acc": best,
                                                     "best/val/acc": best, "num_classes": 8,
                                                     "val_images": val_images}))


@pytest.fixture(scope="module")
def two_runs(named_run: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny sweep's FC job (default trainer.limit_val_batches) beside the capsule run above."""
    root = tmp_path_factory.mktemp("two_runs")
    sweep = tiny_sweep(tmp_path_factory.getbasetemp())[0]
    shutil.copytree(sweep / "00_head=fc", root / "fc", ignore=shutil.ignore_patterns("checkpoints"))
    shutil.copytree(named_run[0], root / "capsule", ignore=shutil.ignore_patterns("checkpoints"))
    return root


def test_report_labels_name_what_differs_and_no_unset_null(two_runs: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(two_runs, root)
    proc = run_cli("report", str(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = read_csv(root / "report.csv")
    fc, capsule = rows["fc"]["run"], rows["capsule"]["run"]
    assert "=null" not in fc + capsule  # the FC run did not set trainer.limit_val_batches
    assert "head=fc" in fc.split(",") and "adapter=none" in fc.split(",")
    assert "trainer.limit_val_batches=1" in capsule.split(",") and "trainer.limit_val_batches" not in fc
    for same in ("data.image_size", "trainer.max_steps", "data.batch_size"):  # equal in both runs
        assert same not in fc + capsule


@pytest.mark.slow
def test_report_says_when_runs_are_too_short_for_accuracy(two_runs: Path, tmp_path: Path) -> None:
    root = tmp_path / "runs"
    shutil.copytree(two_runs, root)
    hand_made_run(root / "long_good", 400, 0.30, 500)   # 2 standard errors above 1/8: 0.155
    hand_made_run(root / "long_lucky", 400, 0.16, 96)   # ... on 96 images: 0.192
    proc = run_cli("report", str(root), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (note,) = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    labels = {folder: row["run"] for folder, row in read_csv(root / "report.csv").items()}
    named = note.split(": ", 2)[2]
    assert all(labels[f] in named for f in ("fc", "capsule", "long_lucky")) and labels["long_good"] not in named
    assert "fewer than 50 steps" in note and "standard errors of chance" in note
    assert sum(line.startswith("note: too short for accuracy to mean anything: ")
               for line in (root / "report.md").read_text().splitlines()) == 1

    alone = tmp_path / "alone"
    shutil.copytree(two_runs, alone)
    proc = run_cli("report", str(alone), cwd=tmp_path)
    assert "note: too short for accuracy to mean anything: every run " in proc.stdout


def test_report_figure_shows_chance_on_a_zero_to_one_axis(two_runs: Path) -> None:
    for name in ("fc", "capsule"):
        metrics = json.loads((two_runs / name / "metrics.json").read_text())
        assert metrics["num_classes"] == 8 and metrics["val_images"] == 8  # 8 val images / 1 batch of 8
    runs = [read_run(path, two_runs) for path in find_runs(two_runs)]
    figure = report_figure(runs, build_rows(runs)[1])
    (accuracy,) = [ax for ax in figure.axes if ax.get_title() == "validation accuracy"]
    titles = {ax.get_title().split(" per stage")[0] for ax in figure.axes}
    assert {"median gradient norm", "median update/weight", "drift"} <= titles  # one panel each
    assert accuracy.get_ylim() == (0.0, 1.0)
    chance = [line for line in accuracy.get_lines() if line.get_label().startswith("chance")]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == pytest.approx([1 / 8, 1 / 8])


@pytest.mark.slow
def test_report_reads_event_files_of_older_run_folders(named_run: tuple[Path, subprocess.CompletedProcess],
                                                      tmp_path: Path) -> None:
    old = tmp_path / "old" / "run"
    shutil.copytree(named_run[0], old, ignore=shutil.ignore_patterns("checkpoints", "metrics.json"))
    (old / "tb").mkdir()
    for events in old.glob(EVENTS):
        events.rename(old / "tb" / events.name)
    proc = run_cli("report", str(tmp_path / "old"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = read_csv(tmp_path / "old" / "report.csv")["run"]
    assert row["status"] == "running/crashed" and row["steps"] == "4" and row["best_val_acc"] != ""
