"""The head interface and the FC head.

Every head maps the (adapted) backbone feature map ``[B, C, H, W]`` to a ``HeadOutput``: class
scores ``[B, num_classes]`` plus whatever else it computed on the way (``extras``). The loop, the
losses and the monitor pass those values on; they never ask which head they hold, and no hook
reads state left behind by an earlier forward.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from capsexp.checks import Check, below_one


class HeadOutput(NamedTuple):
    """What one forward of a head computed (a NamedTuple: DDP and torch.compile pass it through)."""

    scores: Tensor              # [B, num_classes]
    extras: dict[str, Tensor]   # head-specific values the optional methods below read


class Head(nn.Module):
    """Base class: ``forward(features) -> HeadOutput``.

    Heads with more to say (the capsule head) override the optional methods; each is a function
    of the values it is given, so they may be called in any order, or not at all.
    """

    def auxiliary_loss(self, out: HeadOutput, images: Tensor,
                       targets: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """An extra loss term (e.g. reconstruction) and detached values worth showing, or None."""
        return None

    def telemetry(self, out: HeadOutput, targets: Tensor) -> dict[str, Tensor]:
        """Scalar diagnostics as detached 0-d tensors, keyed by TensorBoard tag (no host sync here)."""
        return {}

    def images(self, visuals: dict[str, Tensor]) -> dict[str, Tensor]:
        """Image grids ``[3, H, W]`` in [0, 1], keyed by tag, from what ``auxiliary_loss`` returned."""
        return {}


class FCHead(Head):
    """Global average pooling + linear: the ResNet original."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> HeadOutput:
        return HeadOutput(self.fc(self.dropout(torch.flatten(self.pool(x), 1))), {})


FC_CHECKS: list[Check] = [("head.dropout", below_one, "a number in [0, 1)")]
