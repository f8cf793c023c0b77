"""Refusals that change nothing: links at output names, folders capsexp did not make, refused runs,
resumes and sweeps. Each runs the real command and compares every file of the folder before and after."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from conftest import TINY, CliProcess, mounted_tmpfs, run_cli, start_cli


def digest(root: Path) -> dict[str, str]:
    """Every entry below ``root``: a link by its target, a file by its bytes and mode, a folder by its mode."""
    out = {}
    for here, dirs, files in os.walk(root):
        for name in [*dirs, *files]:
            path = Path(here) / name
            key = str(path.relative_to(root))
            if path.is_symlink():
                out[key] = "link " + os.readlink(path)
            elif path.is_file():
                out[key] = f"file {oct(path.stat().st_mode)} {hashlib.sha256(path.read_bytes()).hexdigest()}"
            else:
                out[key] = f"dir {oct(path.stat().st_mode)}"
    return out


def one_error_line(proc: object, expected_start: str) -> str:
    stderr = getattr(proc, "stderr")
    assert getattr(proc, "returncode") == 2, stderr[-2000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("capsexp: error: " + expected_start), stderr[-2000:]
    return line


def hand_made_run(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text("head:\n  name: fc\nseed: 0\n")
    (folder / "environment.json").write_text(json.dumps({"capsexp": "0.1.0"}))
    (folder / "metrics.json").write_text(json.dumps({"status": "completed", "steps": 4, "val/acc": 0.5}))


@pytest.mark.parametrize("name", ["report.md", "report.csv", "report.png"])
def test_report_refuses_a_link_at_an_output_name(tmp_path: Path, name: str) -> None:
    root, precious = tmp_path / "sweep", tmp_path / "precious.txt"
    hand_made_run(root / "0_a")
    precious.write_text("the user's own file\n")
    (root / name).symlink_to(precious)
    before = digest(tmp_path)
    proc = run_cli("report", str(root), cwd=tmp_path)
    line = one_error_line(proc, f"'{root / name}' is a symbolic link; capsexp never writes through a link.")
    assert line.endswith("Remove the link, or write to another folder.")
    assert digest(tmp_path) == before


def test_report_replaces_its_own_files_whole(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    hand_made_run(root / "0_a")
    (root / "report.md").write_text("an old report\n")
    assert run_cli("report", str(root), cwd=tmp_path).returncode == 0
    assert (root / "report.md").read_text().startswith("#") and not list(root.glob(".report*.tmp"))


@pytest.mark.parametrize("how", ["path", "interpolation"])
def test_train_refuses_a_folder_capsexp_did_not_make(tmp_path: Path, how: str) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my own settings\n")
    (mine / "environment.json").write_text("{}\n")
    before = digest(tmp_path)
    folder = str(mine) if how == "path" else "${hydra:runtime.cwd}/mine"
    proc = run_cli("train", *TINY, f"hydra.run.dir={folder}", cwd=tmp_path)
    one_error_line(proc, f"the run folder '{mine}' already holds files that capsexp did not write;")
    assert digest(tmp_path) == before


def test_train_into_a_file_is_named_as_one(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x\n")
    proc = run_cli("train", *TINY, f"hydra.run.dir={tmp_path / 'afile'}", cwd=tmp_path)
    one_error_line(proc, f"the run folder '{tmp_path / 'afile'}' is a file, not a folder;")


@pytest.mark.slow
def test_refused_runs_and_resumes_leave_the_run_folder_byte_identical(tmp_path: Path) -> None:
    run = tmp_path / "run"
    made = run_cli("train", *TINY, f"hydra.run.dir={run}", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    assert (run / ".hydra" / "overrides.yaml").exists() and (run / "cli.log").exists()
    before = digest(tmp_path)
    for folder in (str(run), "${hydra:runtime.cwd}/run"):  # checked before Hydra starts / inside the job
        changed = run_cli("train", *TINY, f"hydra.run.dir={folder}", "trainer.resume=auto", "optim.lr=0.5",
                          cwd=tmp_path)
        one_error_line(changed, "trainer.resume: this run was made with optim.lr=0.001;")
        again = run_cli("train", *TINY, f"hydra.run.dir={folder}", cwd=tmp_path)
        one_error_line(again, f"the run folder '{run}' already holds a run;")
        assert digest(tmp_path) == before


def test_a_sweep_of_no_job_is_refused(tmp_path: Path) -> None:
    proc = run_cli("train", "-m", "seed=range(0,0)", cwd=tmp_path)
    one_error_line(proc, "seed=range(0,0) gives no values, so the sweep would run no job;")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["fc_vs_capsul", "fc_vs_capsule,routing_swep"])
def test_a_misspelt_experiment_is_refused_with_the_list(tmp_path: Path, value: str) -> None:
    proc = run_cli("train", *(["-m"] if "," in value else []), f"experiment={value}", cwd=tmp_path)
    line = one_error_line(proc, f"experiment={value.split(',')[-1]} is not an experiment preset; the presets are ")
    assert "fc_vs_capsule, freeze_sweep, routing_sweep, seed_scenario" in line
    assert list(tmp_path.iterdir()) == []


def test_every_swept_value_is_checked_before_the_first_job(tmp_path: Path) -> None:
    # 200 seeds x 2 sizes: the bad size is the 400th combination, far beyond any cap on combinations
    proc = run_cli("train", "-m", "seed=range(0,200)", "data.image_size=32,16", cwd=tmp_path)
    one_error_line(proc, "in the job with seed=0, data.image_size=16: data.image_size=16 is not allowed;")
    assert list(tmp_path.iterdir()) == []


def image_folder(root: Path, truncate: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    if truncate:
        bad = root / "a" / "0.png"
        bad.write_bytes(bad.read_bytes()[:60])
    return root


@pytest.mark.slow
def test_a_failing_job_does_not_stop_the_sweep_and_the_report_lists_it(tmp_path: Path) -> None:
    image_folder(tmp_path / "good")
    image_folder(tmp_path / "bad", truncate=True)
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY if not a.startswith(("data.train_size", "data.val_size", "data.batch_size"))]
    proc = run_cli("train", "-m", *tiny, "data=imagefolder", "data.batch_size=4", "data.val_fraction=0.5",
                   f"data.root={tmp_path / 'bad'},{tmp_path / 'missing'},{tmp_path / 'good'}",
                   f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (f"capsexp: error: 2 jobs of the sweep failed: {jobs[0]}, {jobs[1]} (each said why above, and "
                    f"in its failed.json); the other jobs ran. capsexp report lists them all.")
    assert json.loads((sweep / jobs[2] / "metrics.json").read_text())["status"] == "completed"  # the last job ran
    report = run_cli("report", str(sweep), cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    table = (sweep / "report.md").read_text()
    assert "failed: data: cannot decode image" in table and "failed: data.root: no folder at" in table
    assert "| completed |" in table


@pytest.mark.slow
def test_a_job_stopped_by_non_finite_values_does_not_stop_the_sweep(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    proc = run_cli("train", "-m", *TINY, "optim=sgd", "optim.momentum=0", "optim.warmup_steps=0",
                   "grads.enabled=false", "optim.lr=1e6,0.001", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    diverged, sane = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert proc.stderr.strip().splitlines()[-1].startswith(f"capsexp: error: 1 job of the sweep failed: {diverged.name} ")
    failure = json.loads((diverged / "failed.json").read_text())
    assert failure["exit_code"] == 3 and "non-finite" in failure["reason"], failure
    assert json.loads((sane / "metrics.json").read_text())["status"] == "completed"  # the job after it ran


def start_run(run: Path, cwd: Path, ignore: tuple[int, ...] = ()) -> CliProcess:
    """A long run with two loader workers, in its own process group, as a scheduler starts one."""
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.max_epochs"))]
    return start_cli("train", *args, "trainer.max_steps=400", "trainer.max_epochs=100", "data.num_workers=2",
                     f"hydra.run.dir={run}", cwd=cwd, ignore=ignore)


def wait_for_training(proc: CliProcess, run: Path) -> None:
    """Until the run has written its first checkpoint (the end of an epoch): workers running, steps going."""
    for _ in range(1200):
        if (run / "checkpoints" / "last.pt").exists():
            time.sleep(0.5)
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError("no checkpoint after two minutes")


@pytest.mark.slow
@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGHUP",), ("SIGINT", "SIGINT")])
def test_a_signal_to_the_process_group_saves_and_resume_continues(tmp_path: Path, signals: tuple[str, ...]) -> None:
    run = tmp_path / "run"
    proc = start_run(run, tmp_path)
    try:
        wait_for_training(proc, run)
        for name in signals:  # to the whole group, workers included, as timeout, Slurm and docker stop do
            os.killpg(proc.pid, getattr(signal, name))
            time.sleep(0.05)
        _, stderr = proc.communicate(timeout=300)
    finally:  # a run that hangs must not outlive the test
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("capsexp: error: interrupted"), stderr[-2000:]
    step = torch.load(run / "checkpoints" / "last.pt", weights_only=False)["state"]["step"]  # whole, loadable
    assert step > 0
    resumed = run_cli("train", *[a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.max_epochs"))],
                      f"trainer.max_steps={step + 3}", "trainer.max_epochs=100", "data.num_workers=2",
                      f"hydra.run.dir={run}", "trainer.resume=auto", cwd=tmp_path)
    assert resumed.returncode == 0 and f"resumed at step {step}" in resumed.stdout, resumed.stderr[-3000:]


def tiny_sweep(sweep: Path, *changes: str, steps: int = 1) -> list[str]:
    return ["train", "-m", *[a for a in TINY if not a.startswith("trainer.max_steps")], f"trainer.max_steps={steps}",
            "seed=0,1", *changes, f"hydra.sweep.dir={sweep}"]


def test_a_sweep_into_a_folder_capsexp_did_not_make_is_refused(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's own file\n")
    before = digest(tmp_path)
    proc = run_cli(*tiny_sweep(mine), cwd=tmp_path)
    one_error_line(proc, f"hydra.sweep.dir '{mine}' already holds files that are not a capsexp sweep's")
    assert digest(tmp_path) == before


@pytest.mark.slow
def test_a_sweep_rerun_with_other_fixed_values_leaves_its_folder_byte_identical(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    made = run_cli(*tiny_sweep(sweep), cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    before = digest(tmp_path)
    proc = run_cli(*tiny_sweep(sweep, "optim.lr=0.5"), cwd=tmp_path)
    line = one_error_line(proc, f"hydra.sweep.dir '{sweep}' holds a sweep made with no optim.lr, and this one has "
                                f"optim.lr=0.5.")
    assert "set hydra.sweep.dir to a new folder" in line
    assert digest(tmp_path) == before
    # the same sweep, made longer and continued, is its own: it runs
    again = run_cli(*tiny_sweep(sweep, "trainer.resume=auto", steps=2), cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("resumed at step 1") == 2, again.stdout[-2000:]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 600 KB tmpfs: room for a run's records, not for its TensorBoard events."""
    with mounted_tmpfs(tmp_path / "disk", "600k", "a disk that fills while TensorBoard writes needs one") as disk:
        yield disk


@pytest.mark.slow
def test_a_disk_that_fills_while_tensorboard_writes_stops_the_run_in_one_sentence(small_disk: Path,
                                                                                 tmp_path: Path) -> None:
    run = small_disk / "run"
    args = [a for a in TINY if not a.startswith(("trainer.max_steps", "trainer.max_epochs", "grads.figure"))]
    proc = run_cli("train", *args, "trainer.max_steps=40", "trainer.max_epochs=10", "grads.figure_every_n_steps=1",
                   "trainer.checkpoints=none", f"hydra.run.dir={run}", cwd=tmp_path)
    line = one_error_line(proc, f"could not write '{run}': no space left on device;")
    assert line.endswith("no checkpoint had been written yet, so the run must start again.")
    assert "Exception in thread" not in proc.stderr  # TensorBoard's writer thread says nothing of its own
    assert (run / "config.yaml").read_text().endswith("name: null\n")  # what was written before is whole


@pytest.mark.slow
def test_a_run_folder_removed_mid_run_stops_the_run_in_one_sentence(tmp_path: Path) -> None:
    import shutil

    run = tmp_path / "run"
    proc = start_run(run, tmp_path)
    try:
        wait_for_training(proc, run)
        while run.exists():  # the run may add a file while the folder is being removed
            shutil.rmtree(run, ignore_errors=True)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    line = one_error_line(subprocess.CompletedProcess(proc.args, proc.returncode, "", stderr),
                          "the run folder 'run' was removed while the run was writing to it")
    assert line.endswith("start it again.")


def test_report_names_a_run_folder_it_cannot_read(tmp_path: Path) -> None:
    root = tmp_path / "sweep"
    hand_made_run(root / "0_a")
    hand_made_run(root / "1_b")
    (root / "1_b").chmod(0)
    # root reads any folder: without its two capabilities to bypass permissions, it reads as a user does
    drop = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    try:
        proc = subprocess.run([*drop, sys.executable, "-m", "capsexp", "report", str(root)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)
    finally:
        (root / "1_b").chmod(0o755)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert f"capsexp: warning: could not read '{root / '1_b'}' (permission denied); the runs inside it are not " \
           f"in the report." in proc.stderr
    assert "1 run;" in proc.stdout


@pytest.mark.slow
def test_a_run_started_with_sighup_ignored_keeps_training_through_it(tmp_path: Path) -> None:
    # `nohup capsexp train ...`: SIGHUP ignored by whoever started it stays ignored, in the loop too
    run = tmp_path / "run"
    proc = start_run(run, tmp_path, ignore=(signal.SIGHUP,))
    try:
        wait_for_training(proc, run)
        os.killpg(proc.pid, signal.SIGHUP)
        time.sleep(2)
        assert proc.poll() is None  # still training
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130 and "received SIGHUP" not in stderr, stderr[-8000:]
    assert "received SIGTERM" in stderr and "Traceback" not in stderr
