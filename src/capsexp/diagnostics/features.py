"""``grad_norm/features`` and ``grad_map/features``: the gradient the head sends into the backbone.

dL/dF for the backbone's output feature map F ``[B, C, h, w]`` (before the adapter), captured by a
hook that exists only on logging steps. Global pooling spreads this gradient evenly over the
``h x w`` positions; primary capsules read each position separately, and the map shows which.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor, nn


class Captured(NamedTuple):
    norm: Tensor           # 0-d: ||dL/dF|| over the whole batch
    position_map: Tensor   # [h, w]: per-position norm over channels, averaged over the batch


def feature_gradient(grad: Tensor) -> Captured:
    """The two summaries of ``grad = dL/dF`` ``[B, C, h, w]``, on its device (no host sync)."""
    g = grad.detach().float()
    return Captured(torch.linalg.vector_norm(g), g.square().sum(dim=1).sqrt().mean(dim=0))


class FeatureGradient:
    """Arms a one-shot forward hook on ``module``; its output's gradient is summarised in backward."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self._handle: Any = None
        self._captured: Captured | None = None

    def arm(self) -> None:
        self.disarm()
        self._handle = self.module.register_forward_hook(self._on_forward)

    def _on_forward(self, module: nn.Module, args: Any, output: Tensor) -> None:
        self.disarm()  # the first forward only: a validation pass never reaches here armed
        if output.requires_grad:  # a frozen backbone sends no gradient back: nothing to show
            output.register_hook(self._on_backward)

    def _on_backward(self, grad: Tensor) -> None:
        self._captured = feature_gradient(grad)

    def disarm(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def take(self) -> Captured | None:
        """What the last armed step captured (None if nothing), and forget it."""
        self.disarm()
        captured, self._captured = self._captured, None
        return captured
