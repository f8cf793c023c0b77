"""The command line of ``capsexp train`` and ``capsexp bench``, checked before Hydra starts a job.

Hydra reports an unknown key or group option with a multi-line message (its config search path
included) after it has created the run folder, and a bad value in a sweep only when that job runs.
``check_command_line`` composes what the command line asks for with Hydra's compose API (the
command's own primary config) and validates it first, so every such mistake is one sentence with
exit code 2 and nothing is written. Whatever it cannot judge here (a custom search path, a value
only known inside the job, a glob sweep) it leaves to Hydra and the run itself: a valid command
line must never be refused.
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import itertools
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from capsexp.config.argv import KNOWN_FLAGS, NO_CHECK_FLAGS, is_hydra_key, split_arguments
from capsexp.errors import UserError, user_error_in
from capsexp.rundir.folder import check_name_lengths
from capsexp.config.tree import CONFIG_NAMES, command_of_group, config_groups, group_option, group_options

# Hydra runs one of these modes per command
MODES = {"-m": "-m", "--multirun": "-m", "-c": "--cfg", "--cfg": "--cfg", "-i": "--info", "--info": "--info",
         "-sc": "--shell-completion", "--shell-completion": "--shell-completion", "-r": "--run", "--run": "--run"}
# values of one swept key listed here (each is composed and checked once, whatever the number of
# combinations); a longer sweep's jobs check themselves when they run
MAX_VALUES = 10_000


def _dotted_keys(cfg: Any, prefix: str = "") -> list[str]:
    if not isinstance(cfg, DictConfig):
        return [prefix[:-1]] if prefix else []
    out: list[str] = []
    for key in cfg.keys():
        out += _dotted_keys(cfg._get_node(key), f"{prefix}{key!s}.")
    return out


def _key_hint(key: str, overrides: list[str], command: str) -> str:
    """Where an unknown key lives: another command's config, another option of its group, or a
    near spelling."""
    group, _, rest = key.partition(".")
    owner = command_of_group(group)
    if owner is not None and group not in config_groups(CONFIG_NAMES[command]):  # bench.* on train
        return f"; it is a setting of capsexp {owner}, not of capsexp {command}."

    def defines(option: str) -> bool:  # a group file is either in its package or global (# @package _global_)
        conf = group_option(group, option)
        return any(OmegaConf.select(conf, path, default=None) is not None for path in (rest, key) if path)

    owners = [option for option in group_options(group) if rest and defines(option)]
    if owners:
        options = " or ".join(f"{group}={o}" for o in owners)
        return f"; it exists only with {options}"
    try:  # the config without the failing override, for spelling suggestions
        keys = _dotted_keys(_compose(command, [o for o in overrides if not o.lstrip("+~").startswith(key + "=")]))
    except UserError:
        keys = []
    close = difflib.get_close_matches(key, keys, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else f" (to add a new key, write +{key}=...)"


# keys that moved, old spelling -> new: the old one gets one sentence naming the new one
MOVED_KEYS = {"loss.reconstruction_weight": ("head.decoder.weight", "head=capsule")}


def override_value(overrides: Sequence[str], key: str) -> str:
    """The value ``key=value`` gives in ``overrides`` (the last one wins), or ``...``."""
    values = [o.split("=", 1)[1] for o in overrides if o.lstrip("+~").split("=", 1)[0] == key and "=" in o]
    return values[-1] if values else "..."


def _compose(command: str, overrides: list[str], with_hydra: bool = False) -> DictConfig:
    """The config ``overrides`` make of the command's primary config (inside an initialised Hydra),
    or UserError with one sentence."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException, MissingConfigException

    config_name = CONFIG_NAMES[command]
    try:
        return compose(config_name=config_name, overrides=overrides, return_hydra_config=with_hydra)
    except MissingConfigException as exc:
        missing = str(getattr(exc, "missing_cfg_file", "") or "")
        group, _, option = missing.rpartition("/")
        if group and group_options(group):
            raise UserError(f"{group}={option} is not an option of {group}; choose from "
                            f"{', '.join(group_options(group))}.") from None
        raise UserError(str(exc).splitlines()[0]) from None
    except ConfigCompositionException as exc:
        text = str(exc)
        found = re.search(r"Could not override '([^']+)'", text)
        if found and found.group(1) and "No match in the defaults list" in text:
            raise UserError(f"{found.group(1)} is not a config group; the groups are "
                            f"{', '.join(config_groups(config_name))}.") from None
        if found and found.group(1) in MOVED_KEYS:
            key = found.group(1)
            new, owner = MOVED_KEYS[key]
            raise UserError(f"{key} is now {new}, an option of {owner}: write {owner} "
                            f"{new}={override_value(overrides, key)}.") from None
        if found and found.group(1):
            key = found.group(1)
            raise UserError(f"{key} is not a key of this configuration{_key_hint(key, overrides, command)}") from None
        raise UserError(text.splitlines()[0]) from None


def _validate(cfg: DictConfig) -> None:
    """``config.validate``; what only the job can resolve (``${hydra:...}``, an environment
    variable set by the launcher) is left to the job."""
    from capsexp.config.validation import Unresolved, validate

    try:
        validate(cfg)
    except Unresolved:  # e.g. a variable the launcher sets inside the job: the job checks itself
        return
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 -- an interpolation this process cannot resolve
        cause = user_error_in(exc)  # a preset's required value (capsexp_required) is a real mistake
        if cause is not None:
            raise cause from None


def _sweep_values(sweep: Any) -> list[str] | None:
    """Every value of a swept override, or None where it cannot be listed here."""
    try:
        if sweep.value_type is not None and sweep.value_type.name == "GLOB_CHOICE_SWEEP":
            options = group_options(sweep.key_or_group)
            glob = sweep.value()
            chosen = [o for o in options if any(fnmatch.fnmatch(o, p) for p in glob.include)
                      and not any(fnmatch.fnmatch(o, p) for p in glob.exclude)]
            return chosen or None
        values = list(itertools.islice(sweep.sweep_string_iterator(), MAX_VALUES + 1))
        if len(values) > MAX_VALUES:
            return None
        return [{"True": "true", "False": "false"}.get(str(v), str(v)) for v in values]
    except Exception:  # noqa: BLE001 -- interval() and other sweeps without a list of values
        return None


def _choices(overrides: Any) -> list[list[str]] | None:
    """``key=value`` for every value of every override (one for a plain one); None where a sweep
    cannot be listed here."""
    out = []
    for override in overrides:
        if not override.is_sweep_override():
            out.append([override.input_line])
            continue
        values = _sweep_values(override)
        if values is None:
            return None
        if not values:
            raise UserError(f"{override.input_line} gives no values, so the sweep would run no job; give at "
                            f"least one value, e.g. seed=range(0,3).")
        out.append([f"{override.get_key_element()}={v}" for v in values])
    return out


def _parse(items: Sequence[str]) -> list[Any]:
    """Hydra's parse of every override, or UserError naming the first that is not one."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for item in items:
        try:
            parsed.append(parser.parse_override(item))
        except HydraException as exc:  # the grammar's errors are raised as HydraException
            raise UserError(f"'{item}' is not a valid override ({str(exc).splitlines()[0].rstrip('.')}); "
                            f"write key=value, e.g. head=capsule or data.image_size=64.") from None
    return parsed


def check_command_line(command: str, args: Sequence[str]) -> Path | None:
    """Raise UserError (one sentence) for a command line Hydra would reject or a job would fail on.

    ``command`` is ``train`` or ``bench``; ``args`` follow it. Under ``-m`` each swept value is
    composed and validated with the other swept keys at their first value, so a bad value fails the
    sweep before its first job runs. A run folder that already holds a run is refused here, before
    Hydra rewrites its ``.hydra/`` record. Returns that folder when the command line names it
    (``hydra.run.dir=<path>`` of a single train run), so it can be locked before Hydra writes there.
    """
    from hydra import initialize_config_module

    flag_tokens, items = split_arguments(args)
    flags = {f.split("=", 1)[0] for f in flag_tokens if f.startswith("-")}
    modes = sorted({MODES[f] for f in flags if f in MODES})
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} cannot be combined; Hydra runs one of -m, --cfg, --info, "
                        f"--run and --shell-completion per command.")
    if flags & NO_CHECK_FLAGS or flags - KNOWN_FLAGS:  # an abbreviation like --multi: Hydra decides
        return None
    parsed = _parse(items)
    hydra_keys = {o.key_or_group: o for o in parsed if is_hydra_key(o.key_or_group)}
    if "hydra.searchpath" in hydra_keys:  # configs from elsewhere: only Hydra can compose them
        return None
    mode = hydra_keys.get("hydra.mode")
    multirun = bool(flags & {"-m", "--multirun"}) or (mode is not None and str(mode.value()) == "MULTIRUN")
    plain = [o for o in parsed if not is_hydra_key(o.key_or_group)]
    sweeps = [o for o in plain if o.is_sweep_override()]
    if sweeps and not multirun:
        raise UserError(f"{sweeps[0].input_line} gives several values; add -m to run one job per value, "
                        f"e.g. capsexp {command} -m {sweeps[0].input_line}")
    fixed = [o.input_line for o in plain if not o.is_sweep_override()]
    _check_experiments(plain)
    _check_group_values(command, plain)
    choices = _choices(sweeps)
    if choices is None:  # the jobs cannot be listed here: each checks itself when it runs
        return None
    printing = bool(flags & {"-c", "--cfg"})  # --cfg shows the config, whatever its values
    with initialize_config_module(config_module="capsexp.conf", version_base="1.3"):
        if multirun:
            preset = _preset_choices(command, parsed, fixed)
            if preset is None:
                return None
            choices += preset
        single = parsed if command == "train" and not multirun and not printing else None
        return _check_jobs(command, fixed, choices, validate=not printing, folder_of=single)


def _check_group_values(command: str, overrides: list[Any]) -> None:
    """A config group needs one of its options: ``data=null`` would leave the run without data."""
    groups = set(config_groups(CONFIG_NAMES[command])) - {"experiment"}
    for override in overrides:
        key = override.key_or_group
        if key in groups and not override.is_sweep_override() and not override.is_delete() \
                and not isinstance(override.value(), str):
            raise UserError(f"{key}={override.value()!s}".replace("None", "null") + f" is not an option of {key}; "
                            f"choose from {', '.join(group_options(key))}.")


def _check_experiments(overrides: list[Any]) -> None:
    """``experiment`` is an optional group: Hydra silently skips an option it cannot find, so a
    misspelt preset would run the defaults."""
    known = group_options("experiment")
    for override in overrides:
        if override.key_or_group.lstrip("+~") != "experiment" or override.value() is None:
            continue
        values = _sweep_values(override) if override.is_sweep_override() else [str(override.value())]
        for value in values or []:
            if value not in known and value != "null":
                raise UserError(f"experiment={value} is not an experiment preset; the presets are "
                                f"{', '.join(known)} (conf/experiment/).")


def _pop_run_dir(cfg: DictConfig) -> Any:
    """Remove Hydra's node, as ``compose(return_hydra_config=False)`` does, and return the raw
    (unresolved) ``hydra.run.dir``: one composition serves the job's checks and the folder's."""
    raw = None
    if "hydra" in cfg:
        run = OmegaConf.to_container(cfg.hydra.run, resolve=False)
        assert isinstance(run, dict)  # hydra.run is a mapping in Hydra's schema (RunDir)
        raw = run.get("dir")
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return raw


def _check_writable_root(raw: Any) -> None:
    """The folder Hydra will create the run folder in (the fixed part of ``hydra.run.dir``, or the
    nearest folder above it that exists) must take a file; else Hydra fails with a traceback."""
    import tempfile

    from capsexp.errors import disk_cause

    if not isinstance(raw, str):
        return
    fixed = raw.split("${", 1)[0]
    root = Path(fixed if fixed.endswith("/") or "${" not in raw else Path(fixed).parent).absolute()
    while not root.exists() and root != root.parent:
        root = root.parent
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as exc:
        cause = disk_cause(exc)
        if cause is None:  # not a disk condition capsexp can word: Hydra's own attempt reports it
            return
        raise UserError(f"could not create the run folder in '{root}': {cause}; run from a writable folder "
                        f"or set hydra.run.dir.") from None


def _preset_choices(command: str, parsed: list[Any], fixed: list[str]) -> list[list[str]] | None:
    """A preset's own sweep (``hydra.sweeper.params``), read as Hydra's sweeper reads it: from the
    config of the non-swept overrides and the command line's ``hydra.sweeper.*`` ones; keys the
    command line sets win. None where a sweep cannot be listed here."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = [o.input_line for o in parsed if o.key_or_group.startswith("hydra.sweeper.")
               and not o.is_sweep_override()]
    # (Hydra composes this config first and stops there if it fails: so does this check)
    params = OmegaConf.select(_compose(command, fixed + sweeper, with_hydra=True), "hydra.sweeper.params",
                              default=None)
    pinned = {o.key_or_group for o in parsed if not is_hydra_key(o.key_or_group)}
    parser = OverridesParser.create()
    return _choices(parser.parse_override(f"{key}={value}") for key, value in (params or {}).items()
                    if key not in pinned)


def _check_jobs(command: str, fixed: list[str], choices: list[list[str]], validate: bool,
                folder_of: list[Any] | None) -> Path | None:
    """Compose (and validate) the first job, then each other value of every swept key once (not
    every combination); with ``folder_of`` (the overrides of a single run), refuse a run folder
    that is taken and return it. A value of a plain key is set into the first job's config rather
    than composed again: only a config group's option changes what is composed."""
    first = [values[0] for values in choices]
    folder = None
    first_cfg = _checked(command, fixed, first, validate, with_hydra=folder_of is not None)
    if folder_of is not None:
        run_dir = _pop_run_dir(first_cfg)
        folder = _check_run_folder(folder_of, first_cfg)
        if folder is None:
            _check_writable_root(run_dir)
    groups = set(config_groups(CONFIG_NAMES[command]))
    for k, values in enumerate(choices):
        for value in values[1:]:
            swept = first[:k] + [value] + first[k + 1:]
            key, _, text = value.partition("=")
            if key in groups or key.startswith(("+", "~", "hydra")) or "@" in key:
                _checked(command, fixed, swept, validate)
            elif validate:
                cfg = copy.deepcopy(first_cfg)
                with open_dict(cfg):
                    OmegaConf.update(cfg, key, _typed(value), merge=True)
                _validated(cfg, swept)
    return folder


def _typed(item: str) -> Any:
    """The value of ``key=value`` as Hydra reads it (5 an int, [a,b] a list, null None)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create().parse_override(item).value()


def _checked(command: str, fixed: list[str], swept: list[str], validate: bool, with_hydra: bool = False
             ) -> DictConfig:
    try:
        cfg = _compose(command, fixed + swept, with_hydra=with_hydra)
    except UserError as exc:
        raise _in_job(swept, exc) from None
    if validate:
        _validated(cfg, swept, hydra_node=with_hydra)
    return cfg


def _validated(cfg: DictConfig, swept: list[str], hydra_node: bool = False) -> None:
    # on a copy: validation resolves loss=default in place, and the first job's config is the base
    # of the other values' (a routing's default loss must follow that routing)
    cfg = copy.deepcopy(cfg)
    if hydra_node:  # validation reads the job's config, without Hydra's node
        with open_dict(cfg):
            cfg.pop("hydra", None)
    try:
        _validate(cfg)
    except UserError as exc:
        raise _in_job(swept, exc) from None


def _in_job(swept: list[str], exc: UserError) -> UserError:
    return UserError(f"in the job with {', '.join(swept)}: {exc}" if swept else str(exc))


def _check_run_folder(parsed: list[Any], cfg: DictConfig) -> Path | None:
    """The taken-folder and resume rules (``capsexp.rundir.resume``), before Hydra writes into the folder;
    raises ``NothingToDo`` for a complete run. Returns the folder where the command line names it."""
    from capsexp.rundir.resume import open_resume

    given = [o.value() for o in parsed if o.key_or_group == "hydra.run.dir"]
    # else the folder is Hydra's to name (a timestamp): the run checks and locks it itself
    folder = Path(given[-1]) if given and isinstance(given[-1], str) and "${" not in given[-1] else None
    if folder is not None:
        check_name_lengths(folder)
    try:
        open_resume(cfg, folder, lazy=True)
    except UserError:
        raise
    except InterpolationResolutionError:  # a value only the job can resolve: the job checks itself
        pass
    return folder
