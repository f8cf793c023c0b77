"""``build_model(cfg)``: backbone -> adapter -> head, the one place a head is looked up."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from torch import Tensor, nn

from capsexp.errors import UserError
from capsexp.models.adapters import build_adapter
from capsexp.models.backbone import OUT_CHANNELS, build_backbone, feature_size
from capsexp.models.heads import FCHead, Head


def _fc(cfg: Any, in_channels: int, size: int, num_classes: int, reconstruction: bool) -> Head:
    return FCHead(in_channels, num_classes, dropout=float(cfg.dropout))


def _capsule(cfg: Any, in_channels: int, size: int, num_classes: int, reconstruction: bool) -> Head:
    from capsexp.models.capsule_head import CapsuleHead

    return CapsuleHead.from_config(cfg, in_channels, (size, size), num_classes, reconstruction)


HEADS: dict[str, Callable[..., Head]] = {"fc": _fc, "capsule": _capsule}


class Classifier(nn.Module):
    """``scores = head(adapter(backbone(x)))``; every head returns ``[B, num_classes]``."""

    def __init__(self, backbone: nn.Module, adapter: nn.Module, head: Head) -> None:
        super().__init__()
        self.backbone = backbone
        self.adapter = adapter
        self.head = head

    def forward_features(self, x: Tensor) -> Tensor:
        return self.adapter(self.backbone(x))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def stages(self) -> "OrderedDict[str, nn.Module]":
        """``stem, layer1..layer4, adapter, head``: the grouping of every gradient statistic."""
        out = self.backbone.stages()
        out["adapter"] = self.adapter
        out["head"] = self.head
        return out


def build_model(cfg: Any, num_classes: int) -> Classifier:
    """Build backbone, adapter and head from the composed config."""
    if cfg.head.name not in HEADS:
        raise UserError(f"head must be one of {', '.join(HEADS)}; got '{cfg.head.name}'.")
    # adapter and head first: a setting that cannot be built fails before weights are read
    adapter = build_adapter(cfg.adapter, OUT_CHANNELS)
    size = adapter.out_size(feature_size(int(cfg.data.image_size)))
    reconstruction = float(cfg.loss.reconstruction_weight) > 0
    try:
        head = HEADS[cfg.head.name](cfg.head, adapter.out_channels, size, num_classes, reconstruction)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return Classifier(build_backbone(cfg.backbone), adapter, head)
