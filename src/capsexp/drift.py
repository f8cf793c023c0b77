"""``drift/<stage>``: linear CKA between each trainable stage's output on a fixed probe set under the
starting weights and under the current ones, measured at every validation.

Only the ``N x N`` centred Gram matrices of the start are kept (they travel in checkpoints, so a
resumed run measures against the same start); the activations are dropped at once.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from capsexp.representations import centred_gram, linear_cka
from capsexp.runtime import Runtime


def _output_module(stage: nn.Module) -> nn.Module:
    """The module whose output is the stage's: the stem is a view over its children, so its last one."""
    if isinstance(stage, nn.ModuleDict):
        return list(stage.values())[-1]
    return stage


def _as_tensor(output: Any) -> Tensor:
    return output.scores if hasattr(output, "scores") else output  # a head returns a HeadOutput


def probe_images(dataset: Any, count: int) -> Tensor:
    """The first ``count`` images of the validation set: fixed, and the same on every rank and resume."""
    return torch.stack([dataset[i][0] for i in range(min(count, len(dataset)))])


class DriftProbe:
    """The probe images, the stages measured and their starting Gram matrices."""

    def __init__(self, images: Tensor, stages: dict[str, nn.Module]) -> None:
        self.images = images
        self.stages = stages
        self.reference: dict[str, Tensor] = {}

    @torch.no_grad()
    def grams(self, model: nn.Module, rt: Runtime) -> dict[str, Tensor]:
        """Centred Gram matrix of every stage's output on the probe set, in evaluation mode."""
        outputs: dict[str, Tensor] = {}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Any) -> None:
                outputs[name] = centred_gram(_as_tensor(output))
            return hook

        handles = [_output_module(stage).register_forward_hook(keep(name)) for name, stage in self.stages.items()]
        was_training = model.training
        model.eval()
        try:
            images, _ = rt.to_device(self.images, torch.zeros(len(self.images), dtype=torch.long))
            model(images)  # fp32, outside autocast: the Gram products want the digits
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        return {name: outputs[name].cpu() for name in self.stages if name in outputs}

    def start(self, model: nn.Module, rt: Runtime) -> None:
        self.reference = self.grams(model, rt)

    def measure(self, model: nn.Module, rt: Runtime) -> dict[str, float]:
        """``drift/<stage>`` for every stage with a starting Gram matrix (1.0: unchanged)."""
        if not self.reference:
            return {}
        now = self.grams(model, rt)
        return {f"drift/{name}": linear_cka(self.reference[name], now[name])
                for name in self.reference if name in now}

    def state_dict(self) -> dict[str, Tensor]:
        return dict(self.reference)

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.reference = {name: gram for name, gram in state.items() if name in self.stages}
