"""The ``capsexp`` command: ``train`` and ``bench`` (Hydra apps) and ``report`` (a folder in, a table out).

Each Hydra entry point is a thin wrapper: all the work happens in functions tests call directly.
The ``capsexp_sweep_subdir`` resolver used by ``hydra.sweep.subdir`` names every sweep job's folder
(and so its TensorBoard run) by the swept keys only.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import Any, Callable, Iterable, Mapping, NoReturn, Sequence

import hydra
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from capsexp.commandline import hydra_argv, is_hydra_key, precheck
from capsexp.errors import UserError, user_error_in

# The command line travels to every job through the environment: joblib workers and Slurm jobs
# (sbatch exports the environment) resolve the folder name in their own process, where sys.argv
# is not the user's command line.
COMMAND_LINE_ENV = "CAPSEXP_COMMAND_LINE"
# a rerun of a pre-empted job with trainer.resume=auto must land in the same folder
SUBDIR_EXCLUDED = frozenset({"trainer.resume"})
MAX_SUBDIR_CHARS = 120  # well below the 255-byte file-name limit, with room for the job number
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]")  # '/' above all: a path value must not make subfolders

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
    _fail_plain(message, code)


def _guarded(work: Callable[[], object]) -> object:
    from capsexp.data import DataError
    from capsexp.engine import StopTraining

    try:
        return work()
    except (UserError, DataError) as exc:
        _fail(str(exc))
    except InterpolationResolutionError as exc:  # e.g. a preset's required value (capsexp_required)
        cause = user_error_in(exc)
        if cause is None:
            raise
        _fail(str(cause))
    except StopTraining as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:  # before the training loop took over the signal: nothing to save yet
        _fail("interrupted before training started; nothing was written.", 130)


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


def _parse_overrides(items: Iterable[str]) -> list[Any]:
    """Hydra's parse of each item on its own; what is not an override (a flag, its value) is skipped."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for item in items:
        try:
            parsed.append(parser.parse_override(str(item)))
        except Exception:  # noqa: BLE001 -- '-m', '--cfg', 'job' and the like are not overrides
            continue
    return parsed


def swept_keys(command_line: Sequence[str], sweeper_params: Mapping[str, Any] | None) -> list[str]:
    """The keys that vary between the jobs of a sweep, sorted (so the order typed does not matter).

    A command-line sweep (``a,b``, ``range()``, ``choice()``, ``glob()``, ``interval()``) varies; so
    does a sweep in ``hydra.sweeper.params`` unless the command line pins that key to one value
    (the command line wins in Hydra's sweeper).
    """
    given = {o.key_or_group: o.is_sweep_override() for o in _parse_overrides(command_line)
             if not is_hydra_key(o.key_or_group)}
    keys = {key for key, sweep in given.items() if sweep}
    params = _parse_overrides(f"{k}={v}" for k, v in (sweeper_params or {}).items())
    keys |= {o.key_or_group for o in params if o.is_sweep_override() and o.key_or_group not in given}
    return sorted(keys - SUBDIR_EXCLUDED)


def sweep_subdir(job_overrides: Sequence[str], keys: Sequence[str], job_num: int) -> str:
    """One job's folder name: ``<job number>_<key=value,...>`` over the swept ``keys``.

    The job number always leads: it keeps names unique where the values alone would not (a value
    repeated in a sweep, two values that differ only in characters replaced here, a truncated name)
    and lists the folders in launch order. Nothing swept: the job number alone.
    """
    values = {o.key_or_group: o.get_value_element_as_str() for o in _parse_overrides(job_overrides)}
    name = _UNSAFE.sub("_", ",".join(f"{k}={values[k]}" for k in keys if k in values))
    number = f"{int(job_num):02d}"
    return f"{number}_{name[:MAX_SUBDIR_CHARS]}" if name else number


def _sweep_subdir_resolver(job_num: Any, *, _root_: DictConfig) -> str:
    task = OmegaConf.select(_root_, "hydra.overrides.task", default=None)
    params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None)
    try:  # set by main(); without it (the app called some other way) this process's own arguments
        command_line = json.loads(os.environ[COMMAND_LINE_ENV])
    except (KeyError, ValueError):
        command_line = sys.argv[1:]
    keys = swept_keys(command_line if isinstance(command_line, list) else [],
                      OmegaConf.to_container(params) if params is not None else {})
    return sweep_subdir(list(task) if task is not None else [], keys, job_num)


def _required(message: str) -> NoReturn:
    """``${capsexp_required:'...'}``: a value the user must pass (a merged ``???`` would not override)."""
    raise UserError(message)


# registered on import: joblib workers import this module when they unpickle the task function
OmegaConf.register_new_resolver("capsexp_sweep_subdir", _sweep_subdir_resolver, replace=True)
OmegaConf.register_new_resolver("capsexp_required", _required, replace=True)

COMMANDS = {"train": train_app, "bench": bench_app}


def _strip_command_from_completion_line() -> None:
    """Hydra's shell completion re-runs ``capsexp -sc query=...`` with the typed line in
    ``COMP_LINE``; drop the ``train``/``bench`` word so Hydra sees only overrides there."""
    line = os.environ.get("COMP_LINE")
    words = line.split(" ") if line else []
    if len(words) > 1 and words[1] in COMMANDS:
        cut = len(words[1]) + 1
        os.environ["COMP_LINE"] = " ".join([words[0], *words[2:]])
        point = int(os.environ.get("COMP_POINT", len(line)))
        os.environ["COMP_POINT"] = str(max(point - cut, len(words[0])))


def _distributed_overrides(args: list[str]) -> list[str]:
    """Under torchrun every process runs Hydra: they must share one run folder, and only rank 0
    writes Hydra's own files (``.hydra/``, the log) into it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    if not any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        _fail_plain("under torchrun pass hydra.run.dir=<folder> so that all processes share one run folder.")
    if int(os.environ.get("RANK", "0")) == 0:
        return []
    return ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


def _fail_plain(message: str, code: int = 2) -> NoReturn:
    print(f"capsexp: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def main() -> None:
    argv = sys.argv[1:]
    _strip_command_from_completion_line()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        sys.exit(0 if argv else 2)
    command = argv[0]
    if command == "report":
        try:
            report_main(argv[1:])
            sys.stdout.flush()
        except BrokenPipeError:  # `capsexp report ... | head`: the reader left; no traceback
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return
    if command not in COMMANDS:
        if command.startswith("-") or "=" in command:
            command, argv = "train", ["train", *argv]  # Hydra flags alone (e.g. shell completion) mean train
        else:
            print(f"capsexp: error: unknown command '{command}'; use one of train, bench, report.",
                  file=sys.stderr)
            sys.exit(2)
    try:
        precheck(command, argv[1:])
    except UserError as exc:
        _fail_plain(str(exc))
    except Exception:  # noqa: BLE001 -- what the check cannot judge, Hydra reports itself below
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
    os.environ[COMMAND_LINE_ENV] = json.dumps(argv[1:])  # read back by capsexp_sweep_subdir
    # Hydra parses sys.argv itself
    sys.argv = [sys.argv[0], *hydra_argv(argv[1:]), *_distributed_overrides(argv[1:])]
    COMMANDS[command]()


if __name__ == "__main__":
    main()
