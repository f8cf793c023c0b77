"""Every config value checked in one place, before any data or weights are loaded.

The checks themselves live beside the code that reads each group (``CHECKS``, ``OPTION_CHECKS``
and ``cross_check`` in each module, see ``capsexp.checks``); this module only collects them, so
the command-line check and ``train(cfg)`` give the same one-sentence errors.
"""

from __future__ import annotations

from collections.abc import Collection
from types import ModuleType
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import InterpolationResolutionError

from capsexp import runtime
from capsexp.config import feasibility as fits
from capsexp.data import datasets as data
from capsexp.diagnostics import monitor as diagnostics
from capsexp.engine import optim
from capsexp.engine import step as engine
from capsexp.models import losses
from capsexp.checks import Check, one_of
from capsexp.errors import UserError, user_error_in
from capsexp.models import adapters, backbone
from capsexp.config.tree import flatten, group_option  # noqa: F401 -- flatten: for callers
from capsexp.models import capsule_head
from capsexp.models.classifier import HEADS, default_loss
from capsexp.config.naming import LABEL_ALLOWED, valid_label

GROUPS = ("backbone", "adapter", "head", "loss", "data", "optim", "trainer", "grads")
# the module that reads each group with options (its registry names the options)
OPTION_SOURCES: dict[str, tuple[ModuleType | None, Collection[str]]] = {
    "backbone": (backbone, backbone.BACKBONES),
    "adapter": (adapters, adapters.ADAPTERS),
    "head": (None, HEADS),
    "loss": (losses, losses.LOSSES),
    "data": (data, data.DATASET_NAMES),
    "optim": (optim, optim.OPTIMIZERS),
}
# modules whose checks hold whatever option is chosen, in the order a user reads the config
SOURCES: tuple[ModuleType, ...] = (engine, backbone, data, optim, runtime, diagnostics, losses, adapters, fits)
# modules with a cross_check only (their keys' checks come with their option, e.g. head=capsule's)
CROSS_ONLY: tuple[ModuleType, ...] = (capsule_head,)


class Unresolved(UserError):
    """A value whose interpolation cannot be resolved here (e.g. an unset environment variable).
    The command-line check leaves it to the job, whose launcher may set what it refers to."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False, default="<absent>")


def _option_checks(cfg: DictConfig) -> list[Check]:
    """The named option of every group must exist; then that option's own checks apply."""
    checks: list[Check] = []
    for group, (module, registry) in OPTION_SOURCES.items():
        name = _get(cfg, f"{group}.name")
        if name not in registry:
            raise UserError(f"{group}.name={name!r} is not allowed; it must be {one_of(registry)} "
                            f"(choose one with {group}=<option>).")
        if module is None:  # the head group (its registry is HEADS): its options carry their own checks
            checks += HEADS[name].checks
        else:
            checks += getattr(module, "OPTION_CHECKS", {}).get(name, [])
    return checks


def checks_for(cfg: DictConfig) -> list[Check]:
    """Every check that applies to this composed config."""
    checks: list[Check] = [("seed", lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63,
                            "an integer from 0 to 2**63 - 1"),
                           ("name", valid_label, LABEL_ALLOWED)]
    for module in SOURCES:
        checks += getattr(module, "CHECKS", [])
    return checks + _option_checks(cfg)


def _resolve_all(cfg: DictConfig) -> None:
    """Every interpolation resolves, or one sentence names the key whose value does not."""
    try:  # Hydra's own node resolves only inside a running job (hydra.job.num), and Hydra checks it itself
        keys = [k for k in cfg if isinstance(k, str) and k != "hydra"]
        OmegaConf.to_container(OmegaConf.masked_copy(cfg, keys), resolve=True)
    except InterpolationResolutionError as exc:
        cause = user_error_in(exc)  # a preset's required value (capsexp_required) says itself what is wrong
        if cause is not None:
            raise cause from None
        key = str(getattr(exc, "full_key", "") or "a value")
        raw = flatten(OmegaConf.to_container(cfg, resolve=False)).get(key)
        reason = str(exc).splitlines()[0].split("resolving interpolation: ", 1)[-1].strip('"')
        raise Unresolved(f"{key}={raw!r} cannot be resolved ({reason}); set what it refers to, or pass "
                         f"a plain value.") from None


def resolve_default_loss(cfg: DictConfig) -> None:
    """``loss=default`` becomes the head's own loss (for a capsule head, its routing's), with that
    loss's settings as its YAML file has them; in place, so the run records the loss it used."""
    if OmegaConf.select(cfg, "loss.name") != "default":
        return
    name = default_loss(cfg.head)
    with open_dict(cfg):
        cfg.loss = group_option("loss", name)


def validate(cfg: DictConfig) -> None:
    """Raise ``UserError`` on the first value that is wrong, with the key, the value and what is allowed.
    ``loss=default`` is resolved to the head's loss first (``resolve_default_loss``)."""
    missing = [k for k in GROUPS if k not in cfg]
    if missing:
        raise UserError(f"the config has no '{missing[0]}' group; compose it from capsexp's conf/ folder.")
    _resolve_all(cfg)
    resolve_default_loss(cfg)
    for key, ok, allowed in checks_for(cfg):
        value = _get(cfg, key)
        if value == "<absent>":
            raise UserError(f"{key} is missing from the config; it must be {allowed}.")
        if not ok(value):
            raise UserError(f"{key}={value!r} is not allowed; it must be {allowed}.")
    for module in dict.fromkeys((*SOURCES, *(m for m, _ in OPTION_SOURCES.values() if m is not None), *CROSS_ONLY)):
        cross = getattr(module, "cross_check", None)
        if cross is not None:
            cross(cfg)
