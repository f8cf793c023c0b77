"""The ``capsexp`` command: ``train`` and ``bench`` (Hydra apps) and ``report`` (a folder in, a table out).

This module only dispatches: it checks the command line (``overrides_check``), hands Hydra its
arguments (``arguments``) and turns a user's mistake into one sentence and exit code 2. Each app is
a thin wrapper: all the work happens in functions tests call directly.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NoReturn

import hydra
from omegaconf import DictConfig
from omegaconf.errors import InterpolationResolutionError

# imported for their resolvers too: capsexp_sweep_subdir and capsexp_required must be registered
# wherever Hydra composes, joblib workers (which import this module) included
from capsexp import __version__
from capsexp.config import naming as sweeps
from capsexp.config.argv import (distributed_overrides, hydra_argv, records_by_capsexp,
                                 strip_command_from_completion_line)
from capsexp.errors import UserError, say_error, user_error_in
from capsexp.config.tree import CONFIG_NAMES
from capsexp.config.overrides import check_command_line
from capsexp.config.sweep_outcome import FAILED
from capsexp.rundir.lock import hold_run_folder

if TYPE_CHECKING:  # not defined on Windows, which has no forkserver
    from multiprocessing.context import ForkServerContext

USAGE = """usage: capsexp <command> [options]

commands:
  train [overrides...]   train one run (or a sweep with -m); Hydra overrides, e.g. head=capsule adapter=conv
  bench [overrides...]   time training steps for the FC and capsule heads and the gradient diagnostics
  report <folder>        compare every run below a folder: table, report.md, report.csv, report.png

options:
  -h, --help             this message
  -V, --version          capsexp's version, with torch's and torchvision's

`capsexp train --help` lists the config groups and their options.
"""


INTERRUPTED = "interrupted; a checkpoint already in the run folder is intact, and trainer.resume=auto continues from it."


def _fail_plain(message: str, code: int = 2) -> NoReturn:
    say_error(message)
    sys.exit(code)


def _fail(message: str, code: int = 2) -> NoReturn:
    """One clear sentence on stderr and a non-zero exit; the traceback only with HYDRA_FULL_ERROR=1."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise
    _fail_plain(message, code)


def _outcome(work: Callable[[], object]) -> tuple[object, str | None, int]:
    """``work()``'s result, or the one sentence and exit code of why it stopped."""
    from capsexp.engine.loop import StopTraining

    try:
        return work(), None, 0
    except UserError as exc:
        return None, str(exc), 2
    except InterpolationResolutionError as exc:  # e.g. a preset's required value (capsexp_required)
        cause = user_error_in(exc)
        if cause is None:
            raise
        return None, str(cause), 2
    except StopTraining as exc:
        return None, str(exc), exc.exit_code
    except KeyboardInterrupt:  # before the loop took over the signals, or a second Ctrl-C
        return None, INTERRUPTED, 130


def _guarded(work: Callable[[], object]) -> object:
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return work()
    result, message, code = _outcome(work)
    if message is not None:
        _fail_plain(message, code)
    return result


def _in_sweep() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _sweep_job(work: Callable[[], object]) -> object:
    """One job of a sweep: a failure is said, recorded, and the sweep goes on (``capsexp.config.sweep_outcome``)."""
    from hydra.core.hydra_config import HydraConfig

    from capsexp.config.sweep_outcome import record_failure

    result, message, code = _outcome(work)
    if message is None:
        return result
    say_error(message)
    if code == 130:  # interrupted: the sweep stops too
        sys.exit(code)
    record_failure(Path(HydraConfig.get().runtime.output_dir), message, code)
    return None


@hydra.main(version_base="1.3", config_path="conf", config_name=CONFIG_NAMES["train"])
def train_app(cfg: DictConfig) -> float | None:
    from capsexp.train import train

    metrics = (_sweep_job if _in_sweep() else _guarded)(lambda: train(cfg))
    return metrics.get("best/val/acc") if isinstance(metrics, dict) else None  # a sweeper's objective


@hydra.main(version_base="1.3", config_path="conf", config_name=CONFIG_NAMES["bench"])
def bench_app(cfg: DictConfig) -> None:
    from capsexp.bench import bench

    _guarded(lambda: bench(cfg))


def report_main(argv: list[str]) -> None:
    from capsexp.report import main as report

    _guarded(lambda: report(argv))


COMMANDS = {"train": train_app, "bench": bench_app}


def _version() -> str:
    import torch
    import torchvision

    return f"capsexp {__version__} (torch {torch.__version__}, torchvision {torchvision.__version__})"


def _run_app(command: str, args: list[str]) -> None:
    """Check the command line, lock the run folder it names, then hand Hydra (which parses
    ``sys.argv`` itself) its arguments: a second run into a folder in use stops before Hydra
    rewrites that folder's ``.hydra/`` record."""
    from capsexp.rundir.resume import NothingToDo

    folder = None
    try:
        folder = check_command_line(command, args)
    except UserError as exc:
        _fail_plain(str(exc))
    except NothingToDo as done:  # a complete run resumed: say so, change nothing
        print(done, flush=True)
        sys.exit(0)
    except Exception:  # noqa: BLE001 -- what the check cannot judge, Hydra reports itself below
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
    try:
        extra = distributed_overrides(args)
    except UserError as exc:
        _fail_plain(str(exc))
    sweeps.pass_command_line(args)  # read back by capsexp_sweep_subdir, in every job's process
    # train writes Hydra's record itself once a run is accepted; bench leaves it to Hydra
    records = records_by_capsexp(args, extra) if command == "train" else []
    sys.argv = [sys.argv[0], *hydra_argv(args), *extra, *records]
    with contextlib.ExitStack() as held:
        if folder is not None:
            try:
                held.enter_context(hold_run_folder(folder))
            except UserError as exc:
                _fail_plain(str(exc))
        COMMANDS[command]()
    if FAILED:  # a sweep ran every job; some failed (each said why when it stopped)
        jobs = ", ".join(name for name, _ in FAILED)
        _fail_plain(f"{len(FAILED)} job{'s' if len(FAILED) != 1 else ''} of the sweep failed: {jobs} (each said why "
                    f"above, and in its failed.json); the other jobs ran. capsexp report lists them all.", 1)


class _ClosedPipeSafe:
    """stdout that outlives its reader: after `capsexp train | head -1` the run goes on (and its
    files are written) with its further output dropped, instead of stopping at the next print."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._drop()
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._drop()

    def _drop(self) -> None:
        os.dup2(os.open(os.devnull, os.O_WRONLY), self._stream.fileno())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _stop_at_once(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # as Ctrl-C: what is held (the run folder's lock) is let go on the way out


def main() -> None:
    if not isinstance(sys.stdout, _ClosedPipeSafe):
        sys.stdout = _ClosedPipeSafe(sys.stdout)
    # until the training loop takes the signals over (finish the step, save), a scheduler's SIGTERM
    # or a closed terminal's SIGHUP stops the command as Ctrl-C does: one sentence, exit code 130.
    # A signal ignored from the start (SIGHUP under nohup) stays ignored.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _stop_at_once)
    try:
        _main(sys.argv[1:])
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        _fail_plain(INTERRUPTED, 130)


def _main(argv: list[str]) -> None:
    strip_command_from_completion_line(COMMANDS)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command = argv[0]
    if command in ("-V", "--version"):
        print(_version())
        return
    if command == "report":  # `capsexp report ... | head`: _ClosedPipeSafe drops what the reader left
        report_main(argv[1:])
        return
    if command not in COMMANDS:
        if command.startswith("-") or "=" in command:
            command, argv = "train", ["train", *argv]  # Hydra flags alone (e.g. shell completion) mean train
        else:
            _fail_plain(f"unknown command '{command}'; use one of train, bench, report.")
    _run_app(command, argv[1:])


# A new ``capsexp`` process spends about 4 s of a 2-core CPU importing torch and torchvision. Whoever
# starts many commands (the Findings study, the test suite) forks each one from a server process that
# has imported them once: every command is still its own process, with its own folder, environment,
# output files and exit code, entering at ``main`` as ``python -m capsexp`` does.
WARM_IMPORTS = ("torch", "torchvision", "capsexp.cli", "capsexp.train", "capsexp.bench", "capsexp.report")


def warm_processes() -> ForkServerContext:
    """The multiprocessing context whose processes are forked from a server that preloaded
    ``WARM_IMPORTS``: start ``forked`` with it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(WARM_IMPORTS))
    return context


def forked(args: list[str], cwd: str, env: dict[str, str], stdout: str, stderr: str) -> None:
    """``capsexp <args>`` in a process of ``warm_processes()``: in ``cwd`` with exactly ``env``, standard
    output and error appended to the files ``stdout`` and ``stderr`` (the same path for both interleaves
    them as a shell's ``>>log 2>&1``); the process's exit code is the command's."""
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    for fd, path in ((1, stdout), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 -- the process's own streams
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    if "OMP_NUM_THREADS" in env:  # torch, imported before this environment was set, has sized its pool
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    multiprocessing.set_start_method(None, force=True)  # the platform's default, not the forkserver's
    sys.argv = [str(Path(__file__).with_name("__main__.py")), *args]
    main()  # SystemExit's code, or 1 with the traceback for anything else, as Python itself exits


if __name__ == "__main__":
    main()
