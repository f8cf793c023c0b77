"""The model and its loss as one module: what a training step runs and what evaluation scores."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from capsexp.models.classifier import Classifier
from capsexp.models.heads import NOTHING, Measure


class Outcome(NamedTuple):
    """What one forward of the objective computed."""

    loss: Tensor                   # 0-d, float32
    scores: Tensor                 # [B, num_classes]
    telemetry: dict[str, Tensor]   # the head's detached 0-d diagnostics (a logging step only)
    images: dict[str, Tensor]      # image grids the head wants shown (a figure step only)
    hops: dict[str, Tensor]        # the gradient ladder's activations, scores to features (a logging step only)


class Objective(nn.Module):
    """Model plus loss in one module, so DDP sees every parameter the loss uses.

    The head's auxiliary loss (reconstruction) and a learned loss scale take part in the
    forward pass here; wrapping only the classifier would leave them outside DDP's reducer.
    Returns an ``Outcome``: the loss and scores, and the head's telemetry, image grids and ladder
    activations, each only where ``measure`` asks for it (never in evaluation).
    """

    def __init__(self, model: Classifier, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: Tensor, targets: Tensor, progress: float | Tensor, measure: Measure = NOTHING
                ) -> Outcome:
        """``progress`` (fraction of training done) may be a 0-d CPU tensor: see ``train_step``."""
        head = self.model.head
        out = self.model(images, measure)
        # losses in fp32 whatever the autocast dtype: capsule lengths and margins are small numbers
        loss = self._loss(out.scores.float(), targets, progress)
        shown: dict[str, Tensor] = {}
        aux = head.auxiliary_loss(out, images, targets, measure.images) if head.auxiliary_weight > 0 else None
        if aux is not None:
            loss = loss + head.auxiliary_weight * aux[0].float()
            shown = aux[1]
        telemetry = head.telemetry(out, targets) if measure.telemetry else {}
        return Outcome(loss, out.scores, telemetry, shown, out.hops)

    # eager under trainer.compile: a loss that does Python arithmetic on ``progress`` (the spread
    # loss's margin schedule) would otherwise make the compiled graph recompile at every step
    @torch.compiler.disable
    def _loss(self, scores: Tensor, targets: Tensor, progress: float | Tensor) -> Tensor:
        return self.criterion(scores, targets, progress)
