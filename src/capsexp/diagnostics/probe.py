"""``probe/<stage>``: what a backbone stage knows about the task, as the accuracy of a linear probe.

Drift says that a stage changed, not that it learned the task. The standard measure of what a
stage's features say about the labels is a linear classifier trained on them with the network
frozen (Alain and Bengio 2016, "Understanding intermediate layers using linear classifier
probes"): here a multinomial logistic regression with an L2 penalty, fitted by full-batch L-BFGS
on globally pooled outputs of each stage for a fixed set of training images, and scored on a
fixed set of validation images. Measured at the start (step 0) and at validations.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from capsexp.runtime import Runtime

# L-BFGS iterations of one fit (the probe converges well before on a few hundred images)
PROBE_STEPS = 200
# the L2 penalty on the probe's weights, per weight, on standardised features: enough to keep a
# separable probe set from driving the weights to infinity, small beside the data term
PROBE_L2 = 1e-3


class ProbeSet(NamedTuple):
    """The fixed images a probe is fitted on (training images) and scored on (validation images)."""

    train_images: Tensor
    train_labels: Tensor
    val_images: Tensor
    val_labels: Tensor

    @classmethod
    def empty(cls) -> ProbeSet:
        nothing = torch.empty(0)
        return cls(nothing, nothing.long(), nothing, nothing.long())

    @classmethod
    def from_datasets(cls, train: Any, val: Any, count: int) -> ProbeSet:
        """The first ``count`` images of each set: the same on every rank and every resume."""
        if count <= 0:
            return cls.empty()
        def take(ds: Any) -> tuple[Tensor, Tensor]:
            pairs = [ds[i] for i in range(min(count, len(ds)))]
            return torch.stack([p[0] for p in pairs]), torch.tensor([int(p[1]) for p in pairs])
        return cls(*take(train), *take(val))


def fit_probe(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
              steps: int = PROBE_STEPS, l2: float = PROBE_L2) -> float:
    """Validation accuracy of a multinomial logistic regression fitted on ``(train_x, train_y)``.

    Features ``[N, D]`` are standardised with the training set's mean and standard deviation (so
    one penalty suits every stage's scale), then ``W [D, C]`` and ``b [C]`` minimise the mean
    cross-entropy plus ``l2 * ||W||^2`` by full-batch L-BFGS from zero, in float64: a pure function
    of its inputs, the same on every call.
    """
    x = train_x.detach().double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-8)
    x, v = (x - mean) / std, (val_x.detach().double() - mean) / std
    weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
    targets = train_y.to(x.device).long()

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, targets) + l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        predicted = (v @ weight + bias).argmax(1)
    return float((predicted == val_y.to(v.device)).double().mean())


def _pooled(output: Any) -> Tensor:
    """A stage's output ``[N, C, H, W]`` averaged over positions to ``[N, C]``."""
    return output.mean(dim=(2, 3)) if output.dim() == 4 else output.flatten(1)


class LinearProbe:
    """Fits one probe per stage on the probe set's pooled stage outputs, in evaluation mode."""

    def __init__(self, images: ProbeSet, stages: dict[str, nn.Module], num_classes: int) -> None:
        self.images = images
        self.stages = stages
        self.num_classes = num_classes

    @property
    def enabled(self) -> bool:
        return len(self.images.train_images) > 0 and len(self.images.val_images) > 0

    @torch.no_grad()
    def _features(self, model: nn.Module, images: Tensor, rt: Runtime) -> dict[str, Tensor]:
        outputs: dict[str, list[Tensor]] = {name: [] for name in self.stages}

        def keep(name: str) -> Callable[..., None]:
            def hook(module: nn.Module, args: Any, output: Tensor) -> None:
                outputs[name].append(_pooled(output).float())
            return hook

        last = {name: list(stage.children())[-1] if isinstance(stage, nn.ModuleDict) else stage
                for name, stage in self.stages.items()}  # the stem is a view: its last module's output
        handles = [module.register_forward_hook(keep(name)) for name, module in last.items()]
        was_training = model.training
        model.eval()
        try:
            for chunk in images.split(64):  # bounded memory whatever grads.probe.images is
                batch, _ = rt.to_device(chunk, torch.zeros(len(chunk), dtype=torch.long))
                model(batch)
        finally:
            model.train(was_training)
            for handle in handles:
                handle.remove()
        return {name: torch.cat(parts) for name, parts in outputs.items() if parts}

    def measure(self, model: nn.Module, rt: Runtime) -> dict[str, float]:
        """``probe/<stage>``: each stage's probe accuracy on the validation images (in [0, 1])."""
        if not self.enabled:
            return {}
        train = self._features(model, self.images.train_images, rt)
        val = self._features(model, self.images.val_images, rt)
        return {f"probe/{name}": fit_probe(train[name], self.images.train_labels, val[name],
                                           self.images.val_labels, self.num_classes)
                for name in self.stages if name in train and name in val}
