"""Shared fixtures: compose capsexp's own configs and make them tiny enough for a 2-core CPU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from capsexp.cli import forked, warm_processes
from capsexp.config.validation import resolve_default_loss

# a tiny CPU run: a ResNet18 (a test about ResNet50 itself says backbone=resnet50), 32 px images (1x1
# feature map), a few steps, everything logged every step
TINY = [
    "backbone=resnet18", "data.image_size=32", "data.train_size=48", "data.val_size=16", "data.batch_size=8",
    "trainer.max_epochs=1", "trainer.max_steps=4", "trainer.log_every_n_steps=1",
    "trainer.warmup_steps_excluded=1", "trainer.progress=false",
    "grads.log_every_n_steps=1", "grads.figure_every_n_steps=2", "optim.warmup_steps=1",
    "grads.probe.images=0",  # the linear probes cost a second per run: the tests about them turn them on
]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # the shapes dataset cache lives in one temp folder per session, never in the user's home
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def _single_thread() -> Iterator[None]:
    # one intra-op thread: on a shared 2-core runner, OpenMP threads waiting at a barrier for a
    # descheduled peer can make a step tens of times slower
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _one_thread_everywhere() -> Iterator[None]:
    # every test of the session (and run_cli's commands, through OMP_NUM_THREADS=1)
    yield from _single_thread()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    # kept for the modules that ask for it by name; the session already runs on one thread
    yield from _single_thread()


@contextmanager
def mounted_tmpfs(folder: Path, size: str, why_needed: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` at ``folder`` (made here), unmounted afterwards; the test is skipped,
    saying ``why_needed`` and the mount's own error, where the machine does not let it mount one (root)."""
    folder.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"this machine does not let the test mount a tmpfs ({done.stderr.strip() or 'mount failed'}); "
                    f"{why_needed}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def make_cfg(*overrides: str, tiny: bool = True, config_name: str = "config") -> DictConfig:
    """The composed config, as ``capsexp train`` would see it (``config_name="bench"``: as
    ``capsexp bench`` would), with the tiny settings first."""
    with initialize_config_module(config_module="capsexp.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*(TINY if tiny else []), *overrides])
    resolve_default_loss(cfg)  # loss=default is the head's own loss, as train(cfg) resolves it
    return cfg


# each command forked from a process that has imported torch, torchvision and capsexp once
# (capsexp.cli.warm_processes): the suite runs a few hundred of them
_warm = warm_processes()


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every ``capsexp`` a test starts: unbuffered output, and one intra-op thread
    as the tests in this process, unless ``env`` says otherwise."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run the real ``capsexp`` command in its own process (the way a user does) and wait for it."""
    proc = start_cli(*args, cwd=cwd, env=env, new_session=False)
    stdout, stderr = proc.communicate(timeout)
    return subprocess.CompletedProcess(["capsexp", *args], proc.returncode, stdout, stderr)


def _in_session(ignore: tuple[int, ...], new_session: bool, args: list[str], cwd: str, env: dict[str, str],
                stdout: str, stderr: str) -> None:
    if new_session:
        os.setsid()
    for sig in ignore:  # as ``nohup`` does for SIGHUP: what the command inherits
        signal.signal(sig, signal.SIG_IGN)
    forked(args, cwd, env, stdout, stderr)


class CliProcess:
    """A ``capsexp`` command running in the background (``start_cli``), with Popen's names for what
    the tests use: ``pid``, ``poll``, ``send_signal``, ``communicate``, ``returncode``."""

    def __init__(self, args: tuple[str, ...], cwd: Path, env: dict[str, str], new_session: bool,
                 ignore: tuple[int, ...]) -> None:
        self.args = ["capsexp", *args]
        self._streams = tempfile.TemporaryDirectory()
        self._out, self._err = (os.path.join(self._streams.name, name) for name in ("stdout", "stderr"))
        self._proc = _warm.Process(target=_in_session,
                                   args=(ignore, new_session, list(args), str(cwd), env, self._out, self._err))
        self._proc.start()
        self.pid: int = self._proc.pid

    def poll(self) -> int | None:
        return self._proc.exitcode

    @property
    def returncode(self) -> int | None:
        return self._proc.exitcode

    def send_signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def kill(self) -> None:
        self._proc.kill()  # nothing, once it has ended

    def wait(self, timeout: float | None = None) -> int | None:
        self._proc.join(timeout)
        return self._proc.exitcode

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Wait for the command (killing it after ``timeout`` s) and return what it printed."""
        self._proc.join(timeout)
        if self._proc.exitcode is None:
            self._proc.kill()
            self._proc.join()
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        printed = self.output()
        self._streams.cleanup()
        return printed

    def output(self) -> tuple[str, str]:
        """Standard output and error so far."""
        return Path(self._out).read_text(errors="replace"), Path(self._err).read_text(errors="replace")


def start_cli(*args: str, cwd: Path, env: dict[str, str] | None = None, new_session: bool = True,
              ignore: tuple[int, ...] = ()) -> CliProcess:
    """Start ``capsexp <args>`` in the background: by default in a session (process group) of its own,
    as a scheduler starts one, so a test can signal the whole group; ``ignore``: signals it inherits
    ignored."""
    return CliProcess(args, cwd, cli_env(env), new_session, ignore)


def run_cold(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m capsexp`` in a new interpreter, imports and all: for what a fresh start itself does."""
    return subprocess.run([sys.executable, "-m", "capsexp", *args], cwd=cwd, env=cli_env(),
                          capture_output=True, text=True, timeout=timeout)
