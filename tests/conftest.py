"""Shared fixtures: compose capsexp's own configs and make them tiny enough for a 2-core CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
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


def make_cfg(*overrides: str, tiny: bool = True, config_name: str = "config") -> DictConfig:
    """The composed config, as ``capsexp train`` would see it (``config_name="bench"``: as
    ``capsexp bench`` would), with the tiny settings first."""
    with initialize_config_module(config_module="capsexp.conf", version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=[*(TINY if tiny else []), *overrides])
    resolve_default_loss(cfg)  # loss=default is the head's own loss, as train(cfg) resolves it
    return cfg


def run_cli(*args: str, cwd: Path, timeout: int = 600, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess:
    """Run the real ``capsexp`` command in a subprocess (the way a user does), on one intra-op thread
    as the tests in this process (``env`` may say otherwise)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "capsexp", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
