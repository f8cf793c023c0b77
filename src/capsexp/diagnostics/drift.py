"""``drift/<stage>``: linear CKA between each trainable stage's output on a fixed probe set under the
starting weights and under the current ones, measured at every validation.

Only the ``N x N`` centred Gram matrices of the start are kept (they travel in checkpoints, so a
resumed run measures against the same start); the activations are dropped at once. The measure is
linear CKA (Kornblith et al. 2019, "Similarity of Neural Network Representations Revisited"), as pure
functions of activations and Gram matrices.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from capsexp.runtime import Runtime


def centred_gram(features: Tensor) -> Tensor:
    """``H K H`` for ``K = X X^T``: features ``[N, ...]`` flattened to ``[N, D]``, in float64.

    Centring the Gram matrix equals centring each feature over the N examples first
    (``H X (H X)^T``), which is what linear CKA needs; float64 because the Frobenius products
    of large Gram matrices lose digits in float32.
    """
    x = features.detach().flatten(1).double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(k: Tensor, l: Tensor) -> float:
    """Linear CKA from two centred Gram matrices: ``<K, L>_F / (||K||_F ||L||_F)``.

    This is ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``; the ``1/(n-1)^2`` factors of HSIC
    cancel. 1.0 for the same representation (up to an orthogonal transform and an isotropic
    scale), near 0 for unrelated ones; nan when either representation is constant.
    """
    denominator = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    if not float(denominator) > 0:
        return float("nan")
    return float((k * l).sum() / denominator)


def _output_module(stage: nn.Module) -> nn.Module:
    """The module whose output is the stage's: the stem is a view over its children, so its last one."""
    if isinstance(stage, nn.ModuleDict):
        return list(stage.values())[-1]
    return stage


def _as_tensor(output: Any) -> Tensor:
    return output.scores if hasattr(output, "scores") else output  # a head returns a HeadOutput


def probe_images(dataset: Any, count: int) -> Tensor:
    """The first ``count`` images of the validation set: fixed, and the same on every rank and resume
    (an empty tensor for none: drift off)."""
    if count <= 0 or len(dataset) == 0:
        return torch.empty(0)
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
