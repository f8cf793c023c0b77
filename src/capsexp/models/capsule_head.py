"""The capsule head: primary capsules over the backbone feature map, class capsules by routing.

Layout (Sabour et al. 2017, adapted to a ResNet feature map instead of a 9x9 conv on pixels):

* ``primary``: a Conv2d producing ``types * dim`` channels; every (position, type) pair is an
  input capsule ``u_i`` (or, pooled, every type after averaging over positions), squashed.
* ``class_caps``: transformation matrices ``W_ij`` giving predictions ``u_hat_j|i = W_ij u_i``.
* ``dynamic_routing`` turns the predictions into class capsules ``v_j``; the class score is the
  capsule length.
* optionally a decoder reconstructs the (downsampled) input from the true-class capsule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.utils import make_grid

from capsexp.capsules import coupling_entropy, dynamic_routing, squash
from capsexp.checks import Check, boolean, integer, positive
from capsexp.data import IMAGENET_MEAN, IMAGENET_STD
from capsexp.models.heads import Head, HeadOutput

# A primary capsule shorter than this is counted as inactive in telemetry: after squashing,
# length 0.05 means |s| of about 0.23, i.e. a capsule that says almost nothing.
INACTIVE_LENGTH = 0.05
# Added under the square root of the capsule length so its gradient is finite at v = 0.
LENGTH_EPS = 1e-8
# How many inputs (with their reconstructions) the image grid shows.
GRID_IMAGES = 8


def capsule_length(v: Tensor) -> Tensor:
    """Length of capsules along the last axis, ``sqrt(sum v^2 + eps)`` (finite gradient at 0)."""
    return torch.sqrt(v.pow(2).sum(dim=-1) + LENGTH_EPS)


class PrimaryCapsules(nn.Module):
    """Conv2d to ``types * dim`` channels, reshaped into squashed capsules ``[B, I, dim]``.

    Capsule ``i`` is ordered position-major: ``i = position * types + type``. The kernel is
    clipped to the feature-map size so that a 1x1 map (32 px input to a ResNet50) works.
    """

    def __init__(
        self,
        in_channels: int,
        feature_size: tuple[int, int],
        types: int,
        dim: int,
        kernel_size: int,
        stride: int,
        pooled: bool,
    ) -> None:
        super().__init__()
        height, width = feature_size
        self.types, self.dim, kernel = int(types), int(dim), int(kernel_size)
        kernel_hw = (min(kernel, height), min(kernel, width))
        self.out_size = (
            (height - kernel_hw[0]) // stride + 1,
            (width - kernel_hw[1]) // stride + 1,
        )
        if min(self.out_size) < 1:
            raise ValueError(
                f"head.primary.kernel_size={kernel} with head.primary.stride={stride} gives an "
                f"empty output for a {height}x{width} feature map"
            )
        self.feature_size = (height, width)
        self.pooled = bool(pooled)
        self.positions = 1 if self.pooled else self.out_size[0] * self.out_size[1]
        self.num_capsules = self.positions * self.types
        self.conv = nn.Conv2d(in_channels, self.types * self.dim, kernel_hw, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, C, H, W]`` to squashed primary capsules ``[B, I, dim]``."""
        if tuple(x.shape[-2:]) != self.feature_size:
            raise ValueError(
                f"the capsule head was built for {self.feature_size[0]}x{self.feature_size[1]} "
                f"feature maps; got {x.shape[-2]}x{x.shape[-1]}"
            )
        out = self.conv(x)
        batch = out.shape[0]
        if self.pooled:
            capsules = out.mean(dim=(2, 3)).view(batch, self.types, self.dim)
        else:
            capsules = out.view(batch, self.types, self.dim, self.positions)
            capsules = capsules.permute(0, 3, 1, 2).reshape(batch, self.num_capsules, self.dim)
        return squash(capsules)


class ClassCapsules(nn.Module):
    """Transformation matrices ``W`` giving the predictions ``u_hat_j|i = W_ij u_i``.

    ``weight`` is ``[I, J, class_dim, primary_dim]``, or ``[types, J, class_dim, primary_dim]``
    when shared across positions; sharing is done by broadcasting over the position axis, so
    the weight is never copied per position or per batch element.
    """

    def __init__(
        self,
        num_inputs: int,
        types: int,
        num_classes: int,
        class_dim: int,
        primary_dim: int,
        init_std: float,
        share_weights: bool,
    ) -> None:
        super().__init__()
        self.share_weights = bool(share_weights)
        self.types = types
        rows = types if self.share_weights else num_inputs
        shape = (rows, num_classes, class_dim, primary_dim)
        self.weight = nn.Parameter(torch.randn(shape) * init_std)

    def forward(self, u: Tensor) -> Tensor:
        """Primary capsules ``[B, I, primary_dim]`` to predictions ``[B, I, J, class_dim]``."""
        if not self.share_weights:
            return torch.einsum("ijdk,bik->bijd", self.weight, u)
        batch, inputs, dim = u.shape
        by_position = u.view(batch, inputs // self.types, self.types, dim)
        u_hat = torch.einsum("tjdk,bptk->bptjd", self.weight, by_position)
        return u_hat.reshape(batch, inputs, *u_hat.shape[-2:])


def _decoder(in_features: int, hidden: Sequence[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    width = in_features
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU(inplace=True)]
        width = size
    layers += [nn.Linear(width, out_features), nn.Sigmoid()]
    return nn.Sequential(*layers)


def reconstruction_target(images: Tensor, size: int) -> Tensor:
    """ImageNet-normalised images ``[B, 3, H, W]`` back to the originals ``[B, 3, size, size]`` in [0, 1].

    The data pipeline normalises every image per channel with ``IMAGENET_MEAN``/``IMAGENET_STD``
    (grayscale datasets become RGB first); undoing exactly that recovers the image the decoder's
    sigmoid should draw. Values are clamped to [0, 1] (antialiased resizing can overshoot),
    then area-downsampled to ``size``.
    """
    if images.shape[1] != 3:
        raise ValueError(f"reconstruction needs 3-channel ImageNet-normalised images; got {images.shape[1]}")
    x = images.float()
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    original = (x * std + mean).clamp(0.0, 1.0)
    return F.interpolate(original, size=(size, size), mode="area")


class CapsuleHead(Head):
    """Primary capsules, class capsules with dynamic routing, scores = class capsule lengths."""

    def __init__(
        self,
        in_channels: int,
        feature_size: tuple[int, int],
        num_classes: int,
        *,
        primary_types: int,
        primary_dim: int,
        kernel_size: int,
        stride: int,
        pooled: bool,
        class_dim: int,
        init_std: float,
        share_weights: bool,
        routing_iterations: int,
        routing_detach: bool,
        reconstruction: bool,
        decoder_hidden: Sequence[int],
        decoder_image_size: int,
    ) -> None:
        super().__init__()
        self.num_classes, self.class_dim = int(num_classes), int(class_dim)
        self.routing_iterations, self.routing_detach = int(routing_iterations), bool(routing_detach)
        self.primary = PrimaryCapsules(
            in_channels, feature_size, primary_types, primary_dim, kernel_size, stride, pooled
        )
        self.class_caps = ClassCapsules(
            self.primary.num_capsules, self.primary.types, self.num_classes, self.class_dim,
            self.primary.dim, init_std, share_weights,
        )
        self.image_size = int(decoder_image_size)
        self.decoder: nn.Sequential | None = None
        if reconstruction:
            self.decoder = _decoder(
                self.num_classes * self.class_dim, list(decoder_hidden), 3 * self.image_size**2
            )

    @classmethod
    def from_config(
        cls,
        cfg_head: Any,
        in_channels: int,
        feature_size: tuple[int, int],
        num_classes: int,
        reconstruction: bool,
    ) -> CapsuleHead:
        """Build from the ``head`` config group (see ``conf/head/capsule.yaml``)."""
        primary, routing, decoder = cfg_head["primary"], cfg_head["routing"], cfg_head["decoder"]
        return cls(
            in_channels,
            tuple(feature_size),
            num_classes,
            primary_types=primary["types"],
            primary_dim=primary["dim"],
            kernel_size=primary["kernel_size"],
            stride=primary["stride"],
            pooled=primary["pooled"],
            class_dim=cfg_head["class_dim"],
            init_std=cfg_head["init_std"],
            share_weights=cfg_head["share_weights"],
            routing_iterations=routing["iterations"],
            routing_detach=routing["detach"],
            reconstruction=reconstruction,
            decoder_hidden=tuple(decoder["hidden"]),
            decoder_image_size=decoder["image_size"],
        )

    def forward(self, x: Tensor) -> HeadOutput:
        """Features ``[B, C, H, W]`` to class scores (capsule lengths) ``[B, num_classes]``.

        ``extras``: the class capsules ``v`` (with their graph: the reconstruction loss trains
        through them), the coupling entropy of every routing iteration and the primary lengths.
        """
        u = self.primary(x)
        u_hat = self.class_caps(u)
        v, couplings = dynamic_routing(
            u_hat, self.routing_iterations, detach=self.routing_detach, return_couplings=True
        )
        with torch.no_grad():
            # reduced now, so no [iterations, B, I, J] tensor outlives this forward (with 1000
            # classes at 224 px that would be gigabytes held until the next step)
            entropy = torch.stack([coupling_entropy(c) for c in couplings])
        extras = {"v": v, "coupling_entropy": entropy, "primary_lengths": capsule_length(u.detach())}
        return HeadOutput(capsule_length(v), extras)

    def _reconstruct(self, v: Tensor, targets: Tensor) -> Tensor:
        """Decode one class capsule per image (others masked to zero) to ``[B, 3, s, s]``.

        In training the true class's capsule, in evaluation the longest (the predicted class),
        as in the paper: at test time the label must not steer the reconstruction.
        """
        assert self.decoder is not None
        keep = targets if self.training else capsule_length(v.detach()).argmax(dim=-1)
        mask = F.one_hot(keep.long(), self.num_classes).to(v.dtype)
        flat = self.decoder((v * mask[..., None]).flatten(1))
        return flat.float().view(-1, 3, self.image_size, self.image_size)

    def auxiliary_loss(self, out: HeadOutput, images: Tensor,
                       targets: Tensor) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Reconstruction loss: squared error summed over each image, averaged over the batch.

        This is the paper's formulation, to which its weight of 0.0005 applies. The target has
        ``3 * s * s`` values per image (the paper had 28 * 28 = 784), which the weight should
        account for. Also returns the first ``GRID_IMAGES`` targets and reconstructions
        (detached) for ``images``. None when the head has no decoder.
        """
        if self.decoder is None:
            return None
        recon = self._reconstruct(out.extras["v"], targets)
        target = reconstruction_target(images, self.image_size)
        loss = (recon - target).pow(2).flatten(1).sum(dim=1).mean()
        visuals = {"reconstruction": recon[:GRID_IMAGES].detach(),
                   "reconstruction_target": target[:GRID_IMAGES].detach()}
        return loss, visuals

    def telemetry(self, out: HeadOutput, targets: Tensor) -> dict[str, Tensor]:
        """Routing and capsule diagnostics, as detached 0-d tensors.

        ``capsule/inactive_input_fraction`` counts primary capsules shorter than
        ``INACTIVE_LENGTH`` (0.05).
        """
        out_ = {
            f"capsule/coupling_entropy/iter{k + 1}": h
            for k, h in enumerate(out.extras["coupling_entropy"].unbind())
        }
        lengths = out.scores.detach()
        is_true = F.one_hot(targets.long(), self.num_classes).to(lengths.dtype)
        out_["capsule/true_class_length"] = (lengths * is_true).sum() / is_true.sum()
        others = 1.0 - is_true
        out_["capsule/other_class_length"] = (lengths * others).sum() / others.sum().clamp_min(1)
        inactive = (out.extras["primary_lengths"] < INACTIVE_LENGTH).float()
        out_["capsule/inactive_input_fraction"] = inactive.mean()
        return out_

    @torch.no_grad()
    def images(self, visuals: dict[str, Tensor]) -> dict[str, Tensor]:
        """Up to 8 inputs (top row) above their reconstructions, as one grid ``[3, H, W]``."""
        if "reconstruction" not in visuals:
            return {}
        inputs, recon = visuals["reconstruction_target"], visuals["reconstruction"]
        grid = make_grid(torch.cat([inputs.float(), recon.float()]), nrow=inputs.shape[0], padding=2)
        return {"capsule/reconstruction": grid.clamp(0, 1)}


def _hidden(v: Any) -> bool:
    return OmegaConf.is_list(v) and all(integer(1)(h) for h in v)


CHECKS: list[Check] = [
    ("head.routing.iterations", integer(1), "an integer >= 1"),
    ("head.routing.detach", boolean, "true or false"),
    ("head.primary.types", integer(1), "a positive integer"),
    ("head.primary.dim", integer(1), "a positive integer"),
    ("head.primary.kernel_size", integer(1), "a positive integer"),
    ("head.primary.stride", integer(1), "a positive integer"),
    ("head.primary.pooled", boolean, "true or false"),
    ("head.class_dim", integer(1), "a positive integer"),
    ("head.init_std", positive(), "a positive number"),
    ("head.share_weights", boolean, "true or false"),
    ("head.decoder.hidden", _hidden, "a list of positive integers, e.g. [512,1024]"),
    ("head.decoder.image_size", integer(1), "a positive integer"),
]
