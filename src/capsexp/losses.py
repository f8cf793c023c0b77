"""Classification losses on head scores, built from the ``loss`` config group.

Every loss module has ``forward(scores [B, C], targets [B], progress) -> 0-d Tensor`` where
``progress`` in [0, 1] is the fraction of training done. Only the spread loss uses it (its
margin is annealed); the others ignore it, so the trainer treats all losses alike.

``reconstruction_weight`` is part of every loss config but is applied by the trainer to the
head's auxiliary loss, not here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsexp.capsules import margin_loss, spread_loss

LOSS_NAMES = ("ce", "margin", "spread")
_INITIAL_LEARNED_SCALE = 10.0


class ScaledCrossEntropy(nn.Module):
    """Cross-entropy on ``scores * scale``.

    Capsule lengths lie in [0, 1], so unscaled they give nearly uniform softmax outputs; a
    scale (fixed, or learned) makes cross-entropy usable on them. A learned scale is stored
    as its logarithm so that it stays positive under any optimizer step.
    """

    def __init__(self, scale: float | str = 1.0, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        if isinstance(scale, str):
            if scale != "learned":
                raise ValueError(f"loss.scale must be a number or 'learned'; got {scale!r}")
            self.log_scale: nn.Parameter | None = nn.Parameter(
                torch.tensor(math.log(_INITIAL_LEARNED_SCALE))
            )
            self._fixed_scale = 1.0
        else:
            if not float(scale) > 0:
                raise ValueError(f"loss.scale must be > 0; got {scale!r}")
            self.log_scale = None
            self._fixed_scale = float(scale)
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"loss.label_smoothing must be in [0, 1); got {label_smoothing!r}")

    @property
    def scale(self) -> Tensor | float:
        """The current scale (a 0-d tensor when learned)."""
        return self.log_scale.exp() if self.log_scale is not None else self._fixed_scale

    def forward(self, scores: Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        """Cross-entropy of the scaled scores; ``progress`` is ignored."""
        return F.cross_entropy(
            scores * self.scale, targets.long(), label_smoothing=self.label_smoothing
        )


class MarginLoss(nn.Module):
    """The capsule margin loss (Sabour et al. 2017, eq. 4) on capsule lengths."""

    def __init__(self, m_plus: float = 0.9, m_minus: float = 0.1, lambda_: float = 0.5) -> None:
        super().__init__()
        self.m_plus, self.m_minus, self.lambda_ = float(m_plus), float(m_minus), float(lambda_)

    def forward(self, scores: Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        """Margin loss of the scores (capsule lengths); ``progress`` is ignored."""
        return margin_loss(scores, targets, self.m_plus, self.m_minus, self.lambda_)


class SpreadLoss(nn.Module):
    """Spread loss (Hinton et al. 2018) with its margin annealed linearly over training."""

    def __init__(self, m_start: float = 0.2, m_end: float = 0.9) -> None:
        super().__init__()
        self.m_start, self.m_end = float(m_start), float(m_end)

    def margin(self, progress: float) -> float:
        """``m_start + (m_end - m_start) * progress``, with progress clipped to [0, 1]."""
        # Clipped because step-count rounding can put the last step a hair past 1.
        progress = min(max(float(progress), 0.0), 1.0)
        return self.m_start + (self.m_end - self.m_start) * progress

    def forward(self, scores: Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        """Spread loss with the margin for this point of training."""
        return spread_loss(scores, targets, self.margin(progress))


def build_loss(cfg: Any) -> nn.Module:
    """Build the loss module described by the ``loss`` config group (a DictConfig or dict)."""
    name = cfg["name"]
    if name == "ce":
        return ScaledCrossEntropy(scale=cfg["scale"], label_smoothing=cfg["label_smoothing"])
    if name == "margin":
        return MarginLoss(m_plus=cfg["m_plus"], m_minus=cfg["m_minus"], lambda_=cfg["lambda_"])
    if name == "spread":
        return SpreadLoss(m_start=cfg["m_start"], m_end=cfg["m_end"])
    raise ValueError(f"loss.name must be one of {', '.join(LOSS_NAMES)}; got {name!r}")
