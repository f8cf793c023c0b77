"""The ``capsexp`` command: ``train`` and ``bench`` (Hydra apps) and ``report`` (a folder in, a table out).

Each Hydra entry point is a thin wrapper: all the work happens in functions tests call directly.
"""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

import hydra
from omegaconf import DictConfig

from capsexp.errors import UserError

USAGE = """usage: capsexp <command> [options]

commands:
  train [overrides...]   train one run (or a sweep with -m); Hydra overrides, e.g. head=capsule adapter=conv
  bench [overrides...]   time training steps for the FC and capsule heads and the gradient diagnostics
  report <folder>        compare every run below a folder: table, report.md, report.csv, report.png

`capsexp train --help` lists the config groups and their options.
"""


def _fail(message: str, code: int = 2) -> NoReturn:
    """One clear sentence on stderr and a non-zero exit; the traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    print(f"capsexp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def _guarded(work: Callable[[], object]) -> object:
    from capsexp.data import DataError
    from capsexp.engine import StopTraining

    try:
        return work()
    except (UserError, DataError) as exc:
        _fail(str(exc))
    except StopTraining as exc:
        _fail(str(exc), exc.exit_code)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def train_app(cfg: DictConfig) -> float | None:
    from capsexp.train import train

    metrics = _guarded(lambda: train(cfg))
    return metrics.get("best/val/acc") if isinstance(metrics, dict) else None  # a sweeper's objective


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def bench_app(cfg: DictConfig) -> None:
    from capsexp.bench import bench

    _guarded(lambda: bench(cfg))


def report_main(argv: list[str]) -> None:
    from capsexp.report import main as report

    _guarded(lambda: report(argv))


COMMANDS = {"train": train_app, "bench": bench_app}


def main() -> None:
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command = argv[0]
    if command == "report":
        report_main(argv[1:])
        return
    if command not in COMMANDS:
        if command.startswith("-") or "=" in command:
            command, argv = "train", ["train", *argv]  # Hydra flags alone (e.g. shell completion) mean train
        else:
            print(f"capsexp: error: unknown command '{command}'; use one of train, bench, report.",
                  file=sys.stderr)
            sys.exit(2)
    sys.argv = [sys.argv[0], *argv[1:]]  # Hydra parses sys.argv itself
    COMMANDS[command]()


if __name__ == "__main__":
    main()
