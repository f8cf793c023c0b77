"""Classification losses on head scores, built from the ``loss`` config group.

Every loss module has ``forward(scores [B, C], targets [B], progress) -> 0-d Tensor`` where
``progress`` in [0, 1] is the fraction of training done. Only the spread loss uses it (its
margin is annealed); the others ignore it, so the trainer treats all losses alike.

The reconstruction loss is the capsule head's own (``head.decoder.weight``), not a loss option.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsexp.models.capsules import margin_loss, spread_loss
from capsexp.checks import Check, below_one, nonneg, positive
from capsexp.errors import UserError

_INITIAL_LEARNED_SCALE = 10.0
# the smallest activation cross-entropy takes the log of: an activation that underflows to 0
# would give log 0 = -inf and a NaN gradient
ACTIVATION_FLOOR = 1e-12


class ScaledCrossEntropy(nn.Module):
    """Cross-entropy on ``scores * scale``.

    Capsule lengths lie in [0, 1], so unscaled they give nearly uniform softmax outputs; a
    scale (fixed, or learned) makes cross-entropy usable on them. A learned scale is stored
    as its logarithm so that it stays positive under any optimizer step.
    """

    def __init__(self, scale: float | str, label_smoothing: float, activations: bool = False) -> None:
        super().__init__()
        self.label_smoothing = float(label_smoothing)
        self.activations = bool(activations)
        learned = scale == "learned"
        self.log_scale: nn.Parameter | None = nn.Parameter(
            torch.tensor(math.log(_INITIAL_LEARNED_SCALE))) if learned else None
        self._fixed_scale = 1.0 if learned else float(scale)

    @property
    def scale(self) -> Tensor | float:
        """The current scale (a 0-d tensor when learned)."""
        return self.log_scale.exp() if self.log_scale is not None else self._fixed_scale

    def forward(self, scores: Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        """Cross-entropy of the scaled scores; ``progress`` is ignored. Activations in (0, 1) (self and
        EM routing) enter as the log of the normalised activations, as SR-CapsNet has it."""
        if self.activations:
            scores = torch.log(scores.clamp_min(ACTIVATION_FLOOR) / scores.sum(-1, keepdim=True).clamp_min(ACTIVATION_FLOOR))
        return F.cross_entropy(
            scores * self.scale, targets.long(), label_smoothing=self.label_smoothing
        )


class MarginLoss(nn.Module):
    """The capsule margin loss (Sabour et al. 2017, eq. 4) on capsule lengths."""

    def __init__(self, m_plus: float, m_minus: float, lambda_: float) -> None:
        super().__init__()
        self.m_plus, self.m_minus, self.lambda_ = float(m_plus), float(m_minus), float(lambda_)

    def forward(self, scores: Tensor, targets: Tensor, progress: float = 0.0) -> Tensor:
        """Margin loss of the scores (capsule lengths); ``progress`` is ignored."""
        return margin_loss(scores, targets, self.m_plus, self.m_minus, self.lambda_)


class SpreadLoss(nn.Module):
    """Spread loss (Hinton et al. 2018) with its margin annealed linearly over training."""

    def __init__(self, m_start: float, m_end: float) -> None:
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


# the options of the ``loss`` group: name -> builder from the group config
# (the group config, the head's score kind: "logit", "length" or "activation")
LOSSES: dict[str, Callable[[Any, str], nn.Module]] = {
    "ce": lambda cfg, score: ScaledCrossEntropy(scale=cfg["scale"], label_smoothing=cfg["label_smoothing"],
                                                activations=score == "activation"),
    "margin": lambda cfg, score: MarginLoss(m_plus=cfg["m_plus"], m_minus=cfg["m_minus"], lambda_=cfg["lambda_"]),
    "spread": lambda cfg, score: SpreadLoss(m_start=cfg["m_start"], m_end=cfg["m_end"]),
}
CHECKS: list[Check] = []
OPTION_CHECKS: dict[str, list[Check]] = {
    "margin": [("loss.m_plus", nonneg, "a number >= 0"), ("loss.m_minus", nonneg, "a number >= 0"),
               ("loss.lambda_", nonneg, "a number >= 0")],
    "ce": [("loss.scale", lambda v: v == "learned" or positive()(v), "a positive number or learned"),
           ("loss.label_smoothing", below_one, "a number in [0, 1)")],
    "spread": [("loss.m_start", nonneg, "a number >= 0"), ("loss.m_end", nonneg, "a number >= 0")],
}


def cross_check(cfg: Any) -> None:
    if cfg.loss.name == "margin" and not cfg.loss.m_minus < cfg.loss.m_plus:
        raise UserError(f"loss.m_minus={cfg.loss.m_minus} must be below loss.m_plus={cfg.loss.m_plus}.")


def build_loss(cfg: Any, score: str = "logit") -> nn.Module:
    """Build the loss module described by the ``loss`` config group (already validated), for a head
    whose class scores are of kind ``score`` (``capsexp.models.classifier.score_kind``)."""
    return LOSSES[cfg["name"]](cfg, score)
