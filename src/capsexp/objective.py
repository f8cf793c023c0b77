"""The model and its loss as one module: what a training step runs and what evaluation scores."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from capsexp.models import Classifier


class Objective(nn.Module):
    """Model plus loss in one module, so DDP sees every parameter the loss uses.

    The head's auxiliary loss (reconstruction) and a learned loss scale take part in the
    forward pass here; wrapping only the classifier would leave them outside DDP's reducer.
    Returns ``(loss, scores, telemetry, visuals)``: the head's telemetry (detached 0-d tensors)
    and what its auxiliary loss wants shown, all values of this forward.
    """

    def __init__(self, model: Classifier, criterion: nn.Module, aux_weight: float) -> None:
        super().__init__()
        self.model = model
        self.criterion = criterion
        self.aux_weight = aux_weight

    def forward(self, images: Tensor, targets: Tensor, progress: float | Tensor
                ) -> tuple[Tensor, Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """``progress`` (fraction of training done) may be a 0-d CPU tensor: see ``train_step``."""
        out = self.model(images)
        # losses in fp32 whatever the autocast dtype: capsule lengths and margins are small numbers
        loss = self._loss(out.scores.float(), targets, progress)
        visuals: dict[str, Tensor] = {}
        aux = self.model.head.auxiliary_loss(out, images, targets) if self.aux_weight > 0 else None
        if aux is not None:
            loss = loss + self.aux_weight * aux[0].float()
            visuals = aux[1]
        return loss, out.scores, self.model.head.telemetry(out, targets), visuals

    # eager under trainer.compile: a loss that does Python arithmetic on ``progress`` (the spread
    # loss's margin schedule) would otherwise make the compiled graph recompile at every step
    @torch.compiler.disable
    def _loss(self, scores: Tensor, targets: Tensor, progress: float | Tensor) -> Tensor:
        return self.criterion(scores, targets, progress)
