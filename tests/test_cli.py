"""The ``capsexp`` command itself: its version, and each command composing its own config."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torchvision

from capsexp import __version__
from capsexp.cli import forked, warm_processes
from capsexp.errors import UserError
from capsexp.config.overrides import check_command_line
from conftest import make_cfg, run_cli, run_cold


@pytest.mark.parametrize("flag", ["--version", pytest.param("-V", marks=pytest.mark.slow)])
def test_version_names_capsexp_torch_and_torchvision(flag: str, tmp_path: Path) -> None:
    done = run_cold(flag, cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == (f"capsexp {__version__} (torch {torch.__version__}, "
                           f"torchvision {torchvision.__version__})\n")
    assert list(tmp_path.iterdir()) == []


def test_forked_commands_append_both_streams_to_one_log_and_exit_with_their_codes(tmp_path: Path) -> None:
    # as the Findings study runs each training run: `capsexp ... >>runs.log 2>&1`
    log = tmp_path / "runs.log"
    log.write_text("earlier\n")
    codes = []
    for args in (["--version"], ["train", "data.image_size=-1"]):
        proc = warm_processes().Process(target=forked, args=(args, str(tmp_path), dict(os.environ), str(log), str(log)))
        proc.start()
        proc.join(120)
        codes.append(proc.exitcode)
    assert codes == [0, 2]
    lines = log.read_text().splitlines()
    assert lines[:2] == ["earlier", f"capsexp {__version__} (torch {torch.__version__}, "
                                    f"torchvision {torchvision.__version__})"]
    assert lines[-1].startswith("capsexp: error: data.image_size=-1 is not allowed")


def test_training_configs_carry_no_bench_section() -> None:
    assert "bench" not in make_cfg()
    bench = make_cfg("bench.steps=3", config_name="bench")
    assert bench.bench.steps == 3
    assert {k: v for k, v in bench.items() if k != "bench"} == dict(make_cfg())  # the same training groups


def test_bench_keys_are_refused_on_train_and_accepted_on_bench(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="^bench.steps is not a key of this configuration; it is a setting of "
                                        "capsexp bench, not of capsexp train.$"):
        check_command_line("train", ["bench.steps=3"])
    with pytest.raises(UserError, match="^bench is not a config group; the groups are adapter, backbone, data, "):
        check_command_line("train", ["bench=default"])
    check_command_line("bench", ["bench.steps=3", "head=capsule"])  # no UserError
    refused = run_cli("train", "bench.steps=3", cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("capsexp: error: bench.steps is not a key of this configuration")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_bench_shows_its_config_and_help(tmp_path: Path) -> None:
    shown = run_cli("bench", "--cfg", "job", "bench.steps=3", "head=capsule", cwd=tmp_path, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "bench:\n  warmup_steps: 5\n  steps: 3\n" in shown.stdout and "name: capsule" in shown.stdout
    helped = run_cli("bench", "--help", cwd=tmp_path, timeout=120)
    assert helped.returncode == 0 and "routing_iterations:" in helped.stdout and "head: capsule, fc" in helped.stdout
    trained = run_cli("train", "--help", cwd=tmp_path, timeout=120)
    assert trained.returncode == 0 and "routing_iterations:" not in trained.stdout
    assert not (tmp_path / "outputs").exists()
