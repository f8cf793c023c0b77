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

from capsexp.checks import Check, below_one, choice, one_of


class Measure(NamedTuple):
    """What a forward computes for the monitor besides the scores: nothing on most steps.

    ``telemetry``: the head's scalar diagnostics (a logging step); ``images``: the image grids it
    wants shown (a figure step). Evaluation never asks for either.
    """

    telemetry: bool = False
    images: bool = False


NOTHING = Measure()


class HeadOutput(NamedTuple):
    """What one forward of a head computed (a NamedTuple: DDP and torch.compile pass it through)."""

    scores: Tensor              # [B, num_classes]
    extras: dict[str, Tensor]   # head-specific values its own methods below read (only this forward's)
    # with Measure(telemetry=True): the head's activations from the scores back to its input, in
    # order, with their graph (the monitor watches their gradients: the gradient ladder)
    hops: dict[str, Tensor] = {}


class Head(nn.Module):
    """Base class: ``forward(features, measure) -> HeadOutput``.

    Heads with more to say (the capsule head) override the optional methods; each is a function
    of the values it is given, so they may be called in any order, or not at all.
    ``auxiliary_weight`` is the head's own weight for its auxiliary loss (0: none).
    """

    auxiliary_weight: float = 0.0

    @property
    def input_capsules(self) -> int | None:
        """How many input capsules the head routes (None: not a capsule head)."""
        return None

    def forward(self, x: Tensor, measure: Measure = NOTHING) -> HeadOutput:
        raise NotImplementedError

    def auxiliary_loss(self, out: HeadOutput, images: Tensor, targets: Tensor,
                       draw: bool = False) -> tuple[Tensor, dict[str, Tensor]] | None:
        """An extra loss term (e.g. reconstruction), unweighted, and with ``draw`` the image grids
        ``[3, H, W]`` in [0, 1] it wants shown, keyed by tag; None when the head has none."""
        return None

    def telemetry(self, out: HeadOutput, targets: Tensor) -> dict[str, Tensor]:
        """Scalar diagnostics as detached 0-d tensors, keyed by TensorBoard tag (no host sync here).
        Called on logging steps only, on an output made with ``Measure(telemetry=True)``."""
        return {}


# ``head.pool``: how the FC head turns the map into one vector (SR-CapsNet's three baselines)
POOLS = ("avg", "max", "flatten")


class FCHead(Head):
    """Pooling + linear. ``avg`` is the ResNet original; ``max`` pools by maximum; ``flatten`` feeds
    the whole ``C x H x W`` map to the linear layer, so the head sees as much spatial information
    as the capsule head does (a difference can then be told apart from the pooling)."""

    def __init__(self, in_channels: int, feature_size: tuple[int, int], num_classes: int, dropout: float,
                 pool: str = "avg") -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"head.pool={pool!r} is not allowed; it must be one of {', '.join(POOLS)}")
        self.pool: nn.Module = {"avg": nn.AdaptiveAvgPool2d(1), "max": nn.AdaptiveMaxPool2d(1),
                                "flatten": nn.Identity()}[pool]
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        width = in_channels * (feature_size[0] * feature_size[1] if pool == "flatten" else 1)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: Tensor, measure: Measure = NOTHING) -> HeadOutput:
        pooled = torch.flatten(self.pool(x), 1)
        logits = self.fc(self.dropout(pooled))
        return HeadOutput(logits, {}, {"scores": logits, "pooled": pooled} if measure.telemetry else {})


FC_CHECKS: list[Check] = [("head.dropout", below_one, "a number in [0, 1)"),
                          ("head.pool", choice(*POOLS), one_of(POOLS))]
