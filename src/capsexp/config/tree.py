"""capsexp's config tree as files: each command's primary config, its groups, one option as written.

``capsexp train`` composes ``conf/config.yaml``; ``capsexp bench`` composes ``conf/bench.yaml``,
which is the training config plus the ``bench`` group, so a training run never carries bench
settings. Importing this module also registers ``capsexp_required``, the resolver presets use for
a value the user must pass.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any, NoReturn

from omegaconf import DictConfig, OmegaConf

from capsexp.errors import UserError

CONFIG_NAMES = {"train": "config", "bench": "bench"}  # command -> its primary config in conf/


def _conf() -> Any:
    return resources.files("capsexp.conf")


def group_options(group: str) -> list[str]:
    folder = _conf().joinpath(group)
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def group_option(group: str, option: str) -> DictConfig:
    """The file of one option of a config group, as written (its own defaults list not applied)."""
    cfg = OmegaConf.load(str(_conf().joinpath(group, f"{option}.yaml")))
    assert isinstance(cfg, DictConfig)  # every file in conf/ is a mapping, as Hydra requires
    return cfg


@lru_cache(maxsize=None)
def config_groups(config_name: str) -> tuple[str, ...]:
    """The groups a primary config composes: its defaults list and those of the configs it includes
    (``- config`` in ``bench.yaml``); Hydra's own groups aside."""
    groups: set[str] = set()
    primary = OmegaConf.load(str(_conf().joinpath(f"{config_name}.yaml")))
    assert isinstance(primary, DictConfig)  # every file in conf/ is a mapping, as Hydra requires
    for entry in primary.get("defaults", []):
        if isinstance(entry, str):  # another primary config, or _self_
            if entry != "_self_":
                groups |= set(config_groups(entry))
            continue
        key = str(next(iter(entry))).removeprefix("optional ").removeprefix("override ").lstrip("/")
        if not (key == "hydra" or key.startswith("hydra/")):
            groups.add(key)
    return tuple(sorted(groups))


def command_of_group(group: str) -> str | None:
    """The first command whose config composes ``group`` (None: no command's)."""
    return next((command for command, name in CONFIG_NAMES.items() if group in config_groups(name)), None)


def _required(message: str) -> NoReturn:
    """``${capsexp_required:'...'}``: a value the user must pass (a merged ``???`` would not override)."""
    raise UserError(message)


# registered on import: the Hydra apps, the command-line check and bench import this module, and
# joblib workers import the apps' module when they unpickle the task function
OmegaConf.register_new_resolver("capsexp_required", _required, replace=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings as ``{"a.b.c": value}``; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix[:-1]: tree} if prefix else {}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(flatten(value, f"{prefix}{key}."))
    return out
