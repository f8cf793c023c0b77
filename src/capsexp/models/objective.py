"""The model and its loss as one module: what a training step runs and what evaluation scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsexp.models.classifier import Classifier
from capsexp.models.heads import NOTHING, Measure


class Objective(nn.Module):
    """Model plus loss in one module, so DDP sees every parameter the loss uses.

    The head's auxiliary loss (reconstruction) and a learned loss scale take part in the
    forward pass here; wrapping only the classifier would leave them outside DDP's reducer.
    Returns ``(loss, scores, telemetry, images)``: the head's telemetry (detached 0-d tensors) and
    the image grids it wants shown, each only where ``measure`` asks for it (never in evaluation).
    """

    def __init__(self, model: Classifier, criterion: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion

    def forward(self, images: Tensor, targets: Tensor, progress: float | Tensor, measure: Measure = NOTHING
                ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
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
        return loss, out.scores, telemetry, shown

    # eager under trainer.compile: a loss that does Python arithmetic on ``progress`` (the spread
    # loss's margin schedule) would otherwise make the compiled graph recompile at every step
    @torch.compiler.disable
    def _loss(self, scores: Tensor, targets: Tensor, progress: float | Tensor) -> Tensor:
        return self.criterion(scores, targets, progress)
