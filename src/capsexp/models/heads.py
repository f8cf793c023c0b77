"""The head interface and the FC head.

Every head maps the (adapted) backbone feature map ``[B, C, H, W]`` to class scores
``[B, num_classes]``. The training loop, losses, metrics and gradient code only use this
interface, so they never ask which head they are talking to.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Head(nn.Module):
    """Base class: ``forward(features) -> scores [B, num_classes]``.

    Heads with more to say (the capsule head) override the optional hooks below. The hooks
    read state kept from the most recent ``forward``, so they cost no second pass.
    """

    def auxiliary_loss(self, images: Tensor, targets: Tensor) -> Tensor | None:
        """An extra loss term computed from the latest forward (e.g. reconstruction), or None."""
        return None

    def telemetry(self, targets: Tensor) -> dict[str, Tensor]:
        """Scalar diagnostics of the latest forward as 0-d tensors (no host sync here)."""
        return {}

    def images(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Image grids ``[3, H, W]`` in [0, 1] worth showing in TensorBoard, from the latest forward."""
        return {}


class FCHead(Head):
    """Global average pooling + linear: the ResNet50 original."""

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.dropout(torch.flatten(self.pool(x), 1)))
