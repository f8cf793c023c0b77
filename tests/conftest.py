"""Shared fixtures: compose capsexp's own configs and make them tiny enough for a 2-core CPU."""

from __future__ import annotations

import multiprocessing
import os
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


# ``capsexp`` starts in about 4 s on the 2-core machine, nearly all of it importing torch and
# torchvision; the suite runs it a few hundred times. So run_cli forks each command from a server
# process that has imported them once (multiprocessing's forkserver): every command is still its own
# process, with its own folder, environment, output streams and exit code, entering at the same
# ``capsexp.cli.main`` as ``python -m capsexp``; only the imports are already done.
WARM_IMPORTS = ["torch", "torchvision", "capsexp.cli", "capsexp.train", "capsexp.bench", "capsexp.report"]
_warm = multiprocessing.get_context("forkserver")
_warm.set_forkserver_preload(WARM_IMPORTS)


def _capsexp_main(args: list[str], cwd: str, env: dict[str, str], out: str, err: str) -> None:
    """A forked ``capsexp`` command: its folder, environment and streams, then the CLI's own entry point."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 -- the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    torch.set_num_threads(int(env.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    sys.argv = [str(Path(sys.modules["capsexp.cli"].__file__ or "capsexp").with_name("__main__.py")), *args]
    from capsexp.cli import main

    main()  # SystemExit's code, or 1 with the traceback for anything else: multiprocessing does as Python does


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run the real ``capsexp`` command in its own process (the way a user does), on one intra-op
    thread as the tests in this process (``env`` may say otherwise)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory() as streams:
        out, err = os.path.join(streams, "stdout"), os.path.join(streams, "stderr")
        proc = _warm.Process(target=_capsexp_main, args=(list(args), str(cwd), full_env, out, err))
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired(["capsexp", *args], timeout)
        stdout, stderr = (Path(p).read_text(errors="replace") for p in (out, err))
    return subprocess.CompletedProcess(["capsexp", *args], proc.exitcode, stdout, stderr)


def run_cold(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m capsexp`` in a new interpreter, imports and all: for what a fresh start itself does."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "capsexp", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
