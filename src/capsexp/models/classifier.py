"""``build_model(cfg)``: backbone -> adapter -> head, the one place a head is looked up."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, NamedTuple

from torch import Tensor, nn

from capsexp.errors import UserError
from capsexp.models.adapters import Adapter, build_adapter
from capsexp.checks import Check
from capsexp.models.backbone import Backbone, build_backbone, feature_size, load_weights, reinit_stages
from capsexp.models.capsule_head import CHECKS as CAPSULE_CHECKS
from capsexp.models.capsule_head import CapsuleHead
from capsexp.models.routing import ROUTINGS
from capsexp.models.heads import FC_CHECKS, NOTHING, FCHead, Head, HeadOutput, Measure


class HeadOption(NamedTuple):
    """One option of the ``head`` group: its builder and the checks of its own keys."""

    build: Callable[[Any, int, int, int], Head]  # (head cfg, channels, map side, classes)
    checks: list[Check]
    default_loss: Callable[[Any], str]  # (head cfg) -> what loss=default means for it


def _fc(cfg: Any, in_channels: int, size: int, num_classes: int) -> Head:
    return FCHead(in_channels, (size, size), num_classes, float(cfg.dropout), str(cfg.pool))


def _capsule(cfg: Any, in_channels: int, size: int, num_classes: int) -> Head:
    return CapsuleHead.from_config(cfg, in_channels, (size, size), num_classes)


HEADS: dict[str, HeadOption] = {
    "fc": HeadOption(_fc, FC_CHECKS, lambda cfg: "ce"),
    # a routing's own loss; an unknown routing keeps margin so that its check can name it
    "capsule": HeadOption(_capsule, CAPSULE_CHECKS,
                          lambda cfg: ROUTINGS[cfg.routing.name].default_loss if cfg.routing.name in ROUTINGS
                          else "margin"),
}


def score_kind(cfg_head: Any) -> str:
    """What a head's class scores are: ``logit`` (FC), or its routing's ``length``, ``activation`` or ``logit``."""
    if str(cfg_head.name) == "capsule":
        return ROUTINGS[str(cfg_head.routing.name)].score
    return "logit"


def default_loss(cfg_head: Any) -> str:
    """What ``loss=default`` means for this head (``ce`` for an unknown head: its own check names it)."""
    option = HEADS.get(str(cfg_head.name))
    return option.default_loss(cfg_head) if option is not None else "ce"


class Classifier(nn.Module):
    """``head(adapter(backbone(x)))``; every head returns a ``HeadOutput`` (scores ``[B, num_classes]``)."""

    def __init__(self, backbone: Backbone, adapter: Adapter, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.head = head
        # built once: a plain dict, so the modules are not registered a second time
        self._stages = OrderedDict([*backbone.stages().items(), ("adapter", adapter), ("head", head)])

    def forward(self, x: Tensor, measure: Measure = NOTHING) -> HeadOutput:
        features = self.backbone(x)
        adapted = self.adapter(features)
        out = self.head(adapted, measure)
        if not measure.telemetry:
            return out
        # the ladder's last hops: the adapter's output (where there is an adapter) and the features
        hops = {**out.hops, **({"adapter": adapted} if adapted is not features else {}), "features": features}
        return out._replace(hops=hops)

    def stages(self) -> "OrderedDict[str, nn.Module]":
        """``stem, layer1..layer4, adapter, head``: the grouping of every gradient statistic."""
        return self._stages


def build_model(cfg: Any, num_classes: int) -> Classifier:
    """Build backbone, adapter and head from the composed config."""
    # adapter and head first: a setting that cannot be built fails before weights are read
    backbone = build_backbone(cfg.backbone, with_weights=False)  # its channels; weights come last
    adapter = build_adapter(cfg.adapter, backbone.out_channels)
    size = adapter.out_size(feature_size(int(cfg.data.image_size)))
    try:
        head = HEADS[cfg.head.name].build(cfg.head, adapter.out_channels, size, num_classes)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    backbone = load_weights(backbone, cfg.backbone.weights)
    reinit_stages(backbone, list(cfg.backbone.get("reinit", [])))  # after loading: they start afresh
    return Classifier(backbone, adapter, head)
