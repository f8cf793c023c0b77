"""A run folder is input too: one run per folder (two real concurrent ``capsexp train`` processes), a
lock left by a killed run, temporaries of a killed write, and file-system errors on a real small or
read-only tmpfs (where this machine lets the test mount one; otherwise those tests are skipped)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

from capsexp.rundir.checkpoint import load_checkpoint
from conftest import TINY, CliProcess, cli_env, mounted_tmpfs, run_cli, start_cli

# resnet18 at 32 px: a few steps a second, so a long run lasts long enough to be met by a second one
ARGS = [*TINY, "backbone=resnet18", "grads.figure_every_n_steps=0", "grads.drift.probe_images=0"]
LONG = ["trainer.max_steps=400", "trainer.max_epochs=100"]
LOCK = ".capsexp.lock"


def _start_cold(*args: str, cwd: Path) -> subprocess.Popen:
    """A new interpreter, imports and all: for what happens while a command starts."""
    return subprocess.Popen([sys.executable, "-m", "capsexp", "train", *args], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=cli_env())


def _start(*args: str, cwd: Path) -> CliProcess:
    return start_cli("train", *args, cwd=cwd, new_session=False)


def _wait_for(path: Path, proc: CliProcess | subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.1)


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("capsexp: error:") or "Traceback" in line]


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused_and_the_first_goes_on(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _start(*ARGS, *LONG, f"hydra.run.dir={run}", cwd=tmp_path)
    try:
        _wait_for(run / LOCK, first)
        second = run_cli("train", *ARGS, *LONG, "trainer.resume=auto", f"hydra.run.dir={run}", cwd=tmp_path,
                         timeout=300)
        assert first.poll() is None, "the first run ended before the second was refused; make it longer"
        errors = _errors(second.stderr)
        assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
        assert f"is in use by another capsexp run (pid {first.pid} on {os.uname().nodename}, since " in errors[0]
        _wait_for(run / "checkpoints" / "last.pt", first)  # the first run goes on, and trains
        first.send_signal(signal.SIGTERM)  # the first run checkpoints and ends; its lock goes with it
        assert first.wait(timeout=300) == 130
    finally:
        first.kill()
    assert not (run / LOCK).exists()
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["step"] >= 1


@pytest.mark.slow
def test_a_lock_left_by_a_killed_run_is_taken_over_with_a_warning(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _start(*ARGS, "trainer.max_steps=2", "trainer.max_epochs=2", f"hydra.run.dir={run}", cwd=tmp_path)
    _wait_for(run / "checkpoints" / "last.pt", first)  # written when it ends, at step 2
    first.wait(timeout=300)
    # a run killed while it trains leaves its lock and, mid-write, a temporary checkpoint file behind
    killed = _start(*ARGS, *LONG, "trainer.resume=auto", f"hydra.run.dir={run}", cwd=tmp_path)
    _wait_for(run / LOCK, killed)
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    assert (run / LOCK).exists()
    partial = run / "checkpoints" / ".last.pt.abcd1234.tmp"
    partial.write_bytes(b"half a checkpoint")
    again = run_cli("train", *ARGS, "trainer.max_steps=3", "trainer.max_epochs=2", "trainer.resume=auto",
                    f"hydra.run.dir={run}", cwd=tmp_path, timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "Traceback" not in again.stderr and "lock" in again.stderr and str(killed.pid) in again.stderr
    assert "left by an interrupted checkpoint write" in again.stderr and not partial.exists()
    assert "resumed at step 2" in again.stdout and not (run / LOCK).exists()


@pytest.fixture()
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real tmpfs of 200 MB: room for one resnet18 checkpoint with its AdamW state (~134 MB), not two."""
    with mounted_tmpfs(tmp_path / "disk", "200m", "the disk-full and read-only cases are then covered by the "
                       "unit tests of capsexp.errors only") as mount:
        yield mount


@pytest.mark.slow
def test_a_full_disk_is_one_sentence_and_the_previous_checkpoint_survives(tmpfs: Path) -> None:
    run = tmpfs / "run"
    # 2 steps per epoch: last.pt after epoch 1 fits; writing the next one beside it does not
    proc = run_cli("train", *ARGS, "data.train_size=16", "trainer.max_steps=null", "trainer.max_epochs=2",
                   f"hydra.run.dir={run}", cwd=tmpfs.parent, timeout=600)
    errors = _errors(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"capsexp: error: could not write '{run / 'checkpoints' / 'last.pt'}': no space "
                                f"left on device"), errors
    assert load_checkpoint(run / "checkpoints" / "last.pt")["state"]["epoch"] == 1  # the previous one, whole
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_a_read_only_disk_is_one_sentence_naming_the_folder(tmpfs: Path) -> None:
    (tmpfs / "runs").mkdir()
    remount = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True)
    if remount.returncode != 0:
        pytest.skip("this machine does not let the test remount its tmpfs read-only")
    proc = run_cli("train", *ARGS, f"hydra.run.dir={tmpfs / 'runs' / 'run'}", cwd=tmpfs.parent, timeout=300)
    errors = _errors(proc.stderr)
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "read-only file system" in errors[0] and str(tmpfs / "runs") in errors[0], errors
    assert not (tmpfs / "runs" / "run").exists()


def test_a_run_that_has_only_begun_its_record_is_in_use_not_foreign(tmp_path: Path) -> None:
    # a run just started: its lock (held by this live process) and config.yaml, no environment.json yet
    run = tmp_path / "run"
    run.mkdir()
    start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    (run / LOCK).write_text(json.dumps({"pid": os.getpid(), "host": os.uname().nodename, "start": start,
                                        "since": "2026-12-07 10:00:00"}) + "\n")
    (run / "config.yaml").write_text("seed: 0\n")
    second = run_cli("train", *ARGS, f"hydra.run.dir={run}", cwd=tmp_path)
    errors = _errors(second.stderr)
    assert second.returncode == 2 and len(errors) == 1, second.stderr[-2000:]
    assert f"is in use by another capsexp run (pid {os.getpid()} on {os.uname().nodename}, since " in errors[0]


@pytest.mark.slow
def test_a_sigterm_while_a_run_starts_stops_it_in_one_sentence_and_lets_the_folder_go(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first = _start_cold(*ARGS, *LONG, f"hydra.run.dir={run}", cwd=tmp_path)
    try:
        _wait_for(run / LOCK, first)  # the folder is locked; training has not begun
        first.send_signal(signal.SIGTERM)
        _, stderr = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in stderr, stderr[-2000:]
    assert _errors(stderr) == ["capsexp: error: interrupted; a checkpoint already in the run folder is intact, and "
                               "trainer.resume=auto continues from it."]
    assert not (run / LOCK).exists()
