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

from capsexp.errors import UserError

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


def _user_error_in(exc: BaseException) -> UserError | None:
    """The UserError a resolver raised, which OmegaConf wraps (twice) as the exception's context."""
    while exc is not None and not isinstance(exc, UserError):
        exc = exc.__cause__ or exc.__context__
    return exc


def _guarded(work: Callable[[], object]) -> object:
    from capsexp.data import DataError
    from capsexp.engine import StopTraining

    try:
        return work()
    except (UserError, DataError) as exc:
        _fail(str(exc))
    except InterpolationResolutionError as exc:  # e.g. a preset's required value (capsexp_required)
        cause = _user_error_in(exc)
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


def _is_hydra_key(key: str) -> bool:
    return key == "hydra" or key.startswith(("hydra.", "hydra/"))


def swept_keys(command_line: Sequence[str], sweeper_params: Mapping[str, Any] | None) -> list[str]:
    """The keys that vary between the jobs of a sweep, sorted (so the order typed does not matter).

    A command-line sweep (``a,b``, ``range()``, ``choice()``, ``glob()``, ``interval()``) varies; so
    does a sweep in ``hydra.sweeper.params`` unless the command line pins that key to one value
    (the command line wins in Hydra's sweeper).
    """
    given = {o.key_or_group: o.is_sweep_override() for o in _parse_overrides(command_line)
             if not _is_hydra_key(o.key_or_group)}
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


# Hydra flags after which no override check is wanted (help, completion, another config tree)
_NO_CHECK_FLAGS = frozenset({"-h", "--help", "--hydra-help", "--version", "-sc", "--shell-completion", "-i",
                             "--info", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                             "--experimental-rerun"})
_FLAGS_WITH_VALUE = frozenset({"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
                               "-cd", "--config-dir", "--experimental-rerun"})
_INFO_VALUES = frozenset({"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"})
# Hydra runs one of these modes per command
_MODES = {"-m": "-m", "--multirun": "-m", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
          "-sc": "--shell-completion", "--shell-completion": "--shell-completion", "-r": "--run", "--run": "--run"}
MAX_PRECHECKS = 64  # compositions tried for one sweep before the jobs are left to check themselves


def _split_arguments(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Hydra's flags (with their values, in order) and the overrides among the arguments."""
    flags: list[str] = []
    overrides: list[str] = []
    items = list(args)
    index = 0
    while index < len(items):
        item = items[index]
        index += 1
        if not item.startswith("-"):
            overrides.append(item)
            continue
        flags.append(item)
        takes_value = item in _FLAGS_WITH_VALUE or (
            item in ("-i", "--info") and index < len(items) and items[index] in _INFO_VALUES)
        if takes_value and index < len(items):
            flags.append(items[index])
            index += 1
    return flags, overrides


def hydra_argv(args: Sequence[str]) -> list[str]:
    """Flags first, then overrides: Hydra's parser rejects a flag between overrides
    (``capsexp train head=capsule -m head.routing.iterations=1,3`` would otherwise fail)."""
    flags, overrides = _split_arguments(args)
    return [*flags, *overrides]


def _group_options(group: str) -> list[str]:
    from importlib import resources

    folder = resources.files("capsexp.conf").joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def _key_hint(key: str, cfg: DictConfig | None) -> str:
    """Where an unknown key lives: another option of its group, or a near spelling."""
    import difflib

    group, _, rest = key.partition(".")
    def defines(option: str) -> bool:  # a group file is either in its package or global (# @package _global_)
        conf = OmegaConf.load(str(_conf_file(group, option)))
        return any(OmegaConf.select(conf, path, default=None) is not None for path in (rest, key) if path)

    owners = [option for option in _group_options(group) if rest and defines(option)]
    if owners:
        options = " or ".join(f"{group}={o}" for o in owners)
        return f"; it exists only with {options} (add {group}={owners[0]} to the command line)"
    keys = _dotted_keys(cfg) if cfg is not None else []
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else f" (to add a new key, write +{key}=...)"


def _conf_file(group: str, option: str) -> Any:
    from importlib import resources

    return resources.files("capsexp.conf").joinpath(group, f"{option}.yaml")


def _dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    if not isinstance(cfg, DictConfig):
        return [prefix[:-1]] if prefix else []
    out: list[str] = []
    for key in cfg.keys():
        out += _dotted_keys(cfg._get_node(key), f"{prefix}{key}.")
    return out


def _compose(overrides: list[str]) -> DictConfig:
    """The config ``overrides`` make, or UserError with one sentence for what Hydra cannot compose."""
    from hydra import compose, initialize_config_module
    from hydra.errors import ConfigCompositionException, MissingConfigException

    try:
        with initialize_config_module(config_module="capsexp.conf", version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except MissingConfigException as exc:
        missing = str(getattr(exc, "missing_cfg_file", "") or "")
        group, _, option = missing.rpartition("/")
        if group and _group_options(group):
            raise UserError(f"{group}={option} is not an option of {group}; choose from "
                            f"{', '.join(_group_options(group))}.") from None
        raise UserError(str(exc).splitlines()[0]) from None
    except ConfigCompositionException as exc:
        text = str(exc)
        found = re.search(r"Could not override '([^']+)'", text)
        if found and "No match in the defaults list" in text:
            raise UserError(f"{found.group(1)} is not a config group; the groups are "
                            f"{', '.join(_config_groups())}.") from None
        if found:
            key = found.group(1)
            raise UserError(f"{key} is not a key of this configuration{_key_hint(key, _safe_base(overrides, key))}"
                            ) from None
        raise UserError(text.splitlines()[0]) from None


def _config_groups() -> list[str]:
    from importlib import resources

    root = resources.files("capsexp.conf")
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(("_", "hydra")))


def _safe_base(overrides: list[str], bad_key: str) -> DictConfig | None:
    """The config without the override that failed, for spelling suggestions (None if even that fails)."""
    rest = [o for o in overrides if not o.lstrip("+~").startswith(bad_key + "=")]
    try:
        return _compose(rest)
    except UserError:
        return None


def _check_config(cfg: DictConfig) -> None:
    from omegaconf.errors import InterpolationResolutionError

    from capsexp.config import validate

    try:
        validate(cfg)
    except InterpolationResolutionError as exc:  # a preset's required value (capsexp_required)
        cause = _user_error_in(exc)
        if cause is None:
            raise
        raise cause from None


def precheck(command: str, args: Sequence[str]) -> None:
    """Compose and validate what the command line asks for before Hydra starts a job.

    Hydra reports an unknown key or option with its own multi-line message after creating the
    run folder; checked here, every mistake is one sentence with exit code 2 and nothing is
    written. Under ``-m`` every swept value is composed and validated (with the other keys at
    their first value), so a bad value fails the sweep before its first job runs. A run folder
    that already holds a run is refused here, before Hydra rewrites its ``.hydra/`` record.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    flag_tokens, items = _split_arguments(args)
    flags = {f.split("=", 1)[0] for f in flag_tokens if f.startswith("-")}
    modes = sorted({_MODES[f] for f in flags if f in _MODES})
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined; Hydra runs one of -m, --cfg, --info, "
                        f"--run and --shell-completion per command.")
    if flags & _NO_CHECK_FLAGS:
        return
    parser = OverridesParser.create()
    parsed = []
    for item in items:
        try:
            parsed.append(parser.parse_override(item))
        except HydraException as exc:  # the grammar's errors are raised as HydraException
            raise UserError(f"'{item}' is not a valid override ({str(exc).splitlines()[0].rstrip('.')}); "
                            f"write key=value, e.g. head=capsule or data.image_size=64.") from None
    plain = [o for o in parsed if not _is_hydra_key(o.key_or_group)]
    sweeps = [o for o in plain if o.is_sweep_override()]
    multirun = bool(flags & {"-m", "--multirun"})
    if sweeps and not multirun:
        raise UserError(f"{sweeps[0].input_line} gives several values; add -m to run one job per value, "
                        f"e.g. capsexp {command} -m {sweeps[0].input_line}")
    fixed = [o.input_line for o in plain if not o.is_sweep_override()]
    choices = []
    for sweep in sweeps:
        try:
            values = list(sweep.sweep_string_iterator())
        except Exception:  # noqa: BLE001 -- glob() and interval() have no list of values to try
            continue
        choices.append([f"{sweep.get_key_element()}={v}" for v in values])
    first = [values[0] for values in choices]
    candidates = [fixed + first]
    for k, values in enumerate(choices):
        candidates += [fixed + first[:k] + [v] + first[k + 1:] for v in values[1:]]
    for overrides in candidates[:MAX_PRECHECKS]:
        _check_config(_compose(overrides))
    if command == "train" and not multirun and not flags & {"-c", "--cfg"}:  # --cfg only prints
        _check_run_folder(parsed, _compose(candidates[0]))


def _check_run_folder(parsed: list[Any], cfg: DictConfig) -> None:
    from pathlib import Path

    from capsexp.train import refuse_taken_folder

    given = [o.value() for o in parsed if o.key_or_group == "hydra.run.dir"]
    if given and isinstance(given[-1], str) and "${" not in given[-1] and cfg.trainer.resume is None:
        refuse_taken_folder(Path(given[-1]))


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
    os.environ[COMMAND_LINE_ENV] = json.dumps(argv[1:])  # read back by capsexp_sweep_subdir
    # Hydra parses sys.argv itself
    sys.argv = [sys.argv[0], *hydra_argv(argv[1:]), *_distributed_overrides(argv[1:])]
    COMMANDS[command]()


if __name__ == "__main__":
    main()
