"""Every config group option composes, and validation accepts every shipped option."""

from __future__ import annotations

from importlib import resources
from typing import Any

import pytest
from omegaconf import OmegaConf

from capsexp.config.validation import flatten, validate
from capsexp.config.tree import group_option
from conftest import TINY, make_cfg

CONF = resources.files("capsexp.conf")
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and not p.name.startswith("_"))
OPTIONS = [(g, p.name[:-5]) for g in GROUPS for p in sorted(CONF.joinpath(g).iterdir(), key=lambda p: p.name)
           if p.name.endswith(".yaml")]


def test_the_documented_groups_exist() -> None:
    for group in ("backbone", "head", "adapter", "loss", "data", "optim", "trainer", "grads", "experiment"):
        assert group in GROUPS


@pytest.mark.parametrize("group,option", [o for o in OPTIONS if o[0] not in ("experiment", "launcher")])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    overrides = [f"{group}={option}"]
    if group == "data" and option == "imagefolder":
        overrides.append("data.root=/somewhere")
    # tiny sets shapes-only keys; the bench group belongs to capsexp bench's config only
    tiny = group != "data"
    cfg = make_cfg(*overrides, tiny=tiny, config_name="bench" if group == "bench" else "config")
    if (group, option) == ("loss", "default"):  # the head's own loss: ce for the default FC head
        assert cfg.loss.name == "ce" and cfg.loss == group_option("loss", "ce")
        return
    if "name" in cfg[group]:
        assert cfg[group].name == option
    # what the option's file says is what the run gets, but for the keys given on the command line
    given = {o.split("=", 1)[0] for o in [*(TINY if tiny else []), *overrides]}
    written = {k: v for k, v in _as_written(group, option).items() if k not in given}
    assert written, f"{group}/{option}.yaml sets nothing"
    composed = flatten(OmegaConf.to_container(cfg, resolve=False))
    assert {k: composed.get(k, "<absent>") for k in written} == written
    validate(cfg)


def _as_written(group: str, option: str) -> dict[str, Any]:
    """An option file's values as ``{"group.key": value}`` (a ``_global_`` file says where itself)."""
    path = CONF.joinpath(group, f"{option}.yaml")
    tree = OmegaConf.to_container(OmegaConf.load(str(path)), resolve=False)
    tree.pop("defaults", None)
    return flatten(tree if "@package _global_" in path.read_text() else {group: tree})


def test_capsule_head_defaults_to_margin_loss_and_loss_override_wins() -> None:
    assert make_cfg("head=capsule").loss.name == "margin"
    assert make_cfg("head=capsule", "loss=ce").loss.name == "ce"
    assert make_cfg("head=fc").loss.name == "ce"
    assert make_cfg("head=fc", "loss=margin").loss.name == "margin"


def test_the_default_run_is_the_documented_one() -> None:
    cfg = make_cfg(tiny=False)
    assert (cfg.head.name, cfg.adapter.name, cfg.loss.name, cfg.data.name) == ("fc", "none", "ce", "shapes")
    assert cfg.backbone.weights is None  # offline by default
