"""Run folders named by what they are.

A sweep job's folder is ``<job number>_<swept key=value,...>`` (``hydra.sweep.subdir`` calls the
``capsexp_sweep_subdir`` resolver), so every job's folder (and so its TensorBoard run) says what
differs between the jobs. A single run's folder ends in ``_<label>`` (``hydra.run.dir`` calls
``capsexp_run_label``): the user's ``name=<label>``, else ``run_label`` of its config, e.g.
``capsule-conv-r3``. The resolvers are registered when this module is imported: the Hydra apps'
module imports it, and joblib workers import that module when they unpickle the task function.
"""

from __future__ import annotations

import json
import os
import re
import sys
from functools import lru_cache
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from capsexp.config.argv import is_hydra_key
from capsexp.runkeys import keys_where
from capsexp.errors import UserError
from capsexp.config.tree import group_option, group_options

# The command line travels to every job through the environment: joblib workers and Slurm jobs
# (sbatch exports the environment) resolve the folder name in their own process, where sys.argv
# is not the user's command line.
COMMAND_LINE_ENV = "CAPSEXP_COMMAND_LINE"
# a rerun of a pre-empted job with trainer.resume=auto must land in the same folder
SUBDIR_EXCLUDED = frozenset(keys_where("names_folder", False))  # capsexp.runkeys: the one table
MAX_SUBDIR_CHARS = 120  # well below the 255-byte file-name limit, with room for the job number
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+@-]")  # '/' above all: a path value must not make subfolders
MAX_LABEL_CHARS = 100
# a label is a file-name fragment on every file system: no '/', no leading '.' (hidden) or '-' (a flag)
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")
LABEL_ALLOWED = (f"null or a label of at most {MAX_LABEL_CHARS} letters, digits and . _ + - "
                 f"that starts with a letter or digit, e.g. name=baseline")


def pass_command_line(args: Sequence[str]) -> None:
    """Hand the user's arguments (after the command word) to every job of a sweep."""
    os.environ[COMMAND_LINE_ENV] = json.dumps(list(args))


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
    try:  # set by the command; without it (the app called some other way) this process's own arguments
        command_line = json.loads(os.environ[COMMAND_LINE_ENV])
    except (KeyError, ValueError):
        command_line = sys.argv[1:]
    sweep = OmegaConf.to_container(params) if params is not None else {}
    assert isinstance(sweep, dict)  # hydra.sweeper.params is a mapping in every Hydra sweeper's schema
    keys = swept_keys(command_line if isinstance(command_line, list) else [], {str(k): v for k, v in sweep.items()})
    return sweep_subdir(list(task) if task is not None else [], keys, job_num)


def valid_label(value: Any) -> bool:
    """``name=``: null, or a label that can end a folder name (a number such as ``name=7`` too)."""
    if value is None:
        return True
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return False
    return len(str(value)) <= MAX_LABEL_CHARS and _LABEL.fullmatch(str(value)) is not None


@lru_cache(maxsize=None)
def _default_choices(head: str) -> dict[str, str]:
    """The option each group gets when nobody chooses one: ``conf/config.yaml``'s defaults list, as
    the head's own file overrides it (the capsule head makes ``loss=margin`` its default)."""
    primary = OmegaConf.load(str(resources.files("capsexp.conf").joinpath("config.yaml")))
    assert isinstance(primary, DictConfig)  # every file in conf/ is a mapping, as Hydra requires
    sources = [primary]
    if head in group_options("head"):
        sources.append(group_option("head", head))
    choices: dict[str, str] = {}
    for source in sources:
        for entry in source.get("defaults", []):
            if isinstance(entry, DictConfig):  # {group: option}; the rest are "_self_" and the like
                group, option = next(iter(entry.items()))
                choices[str(group).removeprefix("override ").removeprefix("optional ").lstrip("/")] = str(option)
    return choices


def run_label(cfg: Any) -> str:
    """A single run's label: ``name`` when given, else ``<head>-<adapter>``, ``r<routing iterations>``
    for a capsule head, then only what differs from the defaults, in this order: the loss (against
    the head's default loss), the optimizer, ``freeze<depth>``, the backbone and the dataset.
    ``capsexp bench`` folders are labelled ``bench``."""
    def get(key: str) -> Any:
        return OmegaConf.select(cfg, key, default=None)

    if not valid_label(get("name")):
        raise UserError(f"name={get('name')!r} is not allowed; it must be {LABEL_ALLOWED}.")
    if get("name") is not None:
        return str(get("name"))
    if get("bench") is not None:
        return "bench"
    head = str(get("head.name"))
    defaults = _default_choices(head)
    parts = [head, str(get("adapter.name"))]
    if head == "capsule":
        routing = str(get("head.routing.name"))
        parts += [routing] if routing != "dynamic" else []
        if routing_iterates(routing):  # self routing has none to name
            parts.append(f"r{get('head.routing.iterations')}")
    parts += [str(get(f"{g}.name")) for g in ("loss", "optim") if str(get(f"{g}.name")) != defaults.get(g)]
    backbone = str(get("backbone.name"))
    default_depth = group_option("backbone", backbone).get("freeze_depth", 0) \
        if backbone in group_options("backbone") else 0
    if get("backbone.freeze_depth") != default_depth:
        parts.append(f"freeze{get('backbone.freeze_depth')}")
    parts += [str(get(f"{g}.name")) for g in ("backbone", "data") if str(get(f"{g}.name")) != defaults.get(g)]
    return _UNSAFE.sub("_", "-".join(parts))[:MAX_LABEL_CHARS]


def routing_iterates(name: str) -> bool:
    """Whether ``head.routing.iterations`` applies to the routing ``name`` (unknown names: yes)."""
    from capsexp.models.routing import ROUTINGS

    return name not in ROUTINGS or ROUTINGS[name].iterations


def routings_help() -> str:
    """The routing table ``capsexp train --help`` ends with: each routing, its default loss and paper."""
    from capsexp.models.routing import ROUTINGS

    rows = [f"  {name:<10} loss={o.default_loss:<7} {o.summary}" for name, o in ROUTINGS.items()]
    return ("== Routings of head=capsule (head.routing.name=...) ==\nloss=default (the capsule head's) is the "
            "routing's own loss; an explicit loss=... wins.\n" + "\n".join(rows))


def _routings_help_resolver() -> str:
    return routings_help()


def _run_label_resolver(*, _root_: DictConfig) -> str:
    return run_label(_root_)


OmegaConf.register_new_resolver("capsexp_sweep_subdir", _sweep_subdir_resolver, replace=True)
OmegaConf.register_new_resolver("capsexp_run_label", _run_label_resolver, replace=True)
OmegaConf.register_new_resolver("capsexp_routings_help", _routings_help_resolver, replace=True)


def swept_keys_of_this_job() -> list[str]:
    """The keys this Hydra job's sweep varies (none outside a sweep, or outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    # hydra.mode is optional in Hydra's schema (a config composed outside a Hydra app leaves it unset)
    mode = HydraConfig.get().mode if HydraConfig.initialized() else None
    if mode is None or mode.name != "MULTIRUN":
        return []
    try:
        command_line = json.loads(os.environ[COMMAND_LINE_ENV])
    except (KeyError, ValueError):
        command_line = sys.argv[1:]
    params = HydraConfig.get().sweeper.get("params") or {}
    return swept_keys(command_line if isinstance(command_line, list) else [], dict(params))
