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
from torch import Tensor, nn
from torchvision.utils import make_grid

from capsexp.capsules import coupling_entropy, dynamic_routing, squash
from capsexp.models.heads import Head

# A primary capsule shorter than this is counted as inactive in telemetry: after squashing,
# length 0.05 means |s| of about 0.23, i.e. a capsule that says almost nothing.
INACTIVE_LENGTH = 0.05
# Added under the square root of the capsule length so its gradient is finite at v = 0.
LENGTH_EPS = 1e-8
# How many inputs (with their reconstructions) the image grid shows.
GRID_IMAGES = 8


def _positive(value: int, key: str) -> int:
    if isinstance(value, bool) or int(value) != value or value < 1:
        raise ValueError(f"{key} must be an integer >= 1; got {value!r}")
    return int(value)


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
        height, width = (_positive(s, "head feature_size") for s in feature_size)
        self.types = _positive(types, "head.primary.types")
        self.dim = _positive(dim, "head.primary.dim")
        kernel = _positive(kernel_size, "head.primary.kernel_size")
        stride = _positive(stride, "head.primary.stride")
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
    """Images ``[B, 1 or 3, H, W]`` (any normalisation) to ``[B, 3, size, size]`` in [0, 1].

    Area downsampling, then per-image min-max: the inputs arrive ImageNet-normalised, and
    min-max maps them back to the decoder's sigmoid range without knowing the statistics.
    """
    if images.shape[1] not in (1, 3):
        raise ValueError(f"reconstruction needs 1- or 3-channel images; got {images.shape[1]}")
    small = F.interpolate(images.float(), size=(size, size), mode="area")
    small = small.expand(-1, 3, -1, -1)
    low = small.amin(dim=(1, 2, 3), keepdim=True)
    high = small.amax(dim=(1, 2, 3), keepdim=True)
    return (small - low) / (high - low).clamp_min(1e-6)


class CapsuleHead(Head):
    """Primary capsules, class capsules with dynamic routing, scores = class capsule lengths."""

    def __init__(
        self,
        in_channels: int,
        feature_size: tuple[int, int],
        num_classes: int,
        *,
        primary_types: int = 32,
        primary_dim: int = 8,
        kernel_size: int = 1,
        stride: int = 1,
        pooled: bool = False,
        class_dim: int = 16,
        init_std: float = 0.05,
        share_weights: bool = False,
        routing_iterations: int = 3,
        routing_detach: bool = False,
        reconstruction: bool = False,
        decoder_hidden: Sequence[int] = (512, 1024),
        decoder_image_size: int = 28,
    ) -> None:
        super().__init__()
        _positive(in_channels, "head in_channels")
        self.num_classes = _positive(num_classes, "num_classes")
        self.class_dim = _positive(class_dim, "head.class_dim")
        self.routing_iterations = _positive(routing_iterations, "head.routing.iterations")
        self.routing_detach = bool(routing_detach)
        if not init_std > 0:
            raise ValueError(f"head.init_std must be > 0; got {init_std!r}")
        self.primary = PrimaryCapsules(
            in_channels, feature_size, primary_types, primary_dim, kernel_size, stride, pooled
        )
        self.class_caps = ClassCapsules(
            self.primary.num_capsules, self.primary.types, self.num_classes, self.class_dim,
            self.primary.dim, init_std, share_weights,
        )
        self.reconstruction = bool(reconstruction)
        self.decoder: nn.Sequential | None = None
        if self.reconstruction:
            hidden = [_positive(h, "head.decoder.hidden entries") for h in decoder_hidden]
            self.image_size = _positive(decoder_image_size, "head.decoder.image_size")
            self.decoder = _decoder(
                self.num_classes * self.class_dim, hidden, 3 * self.image_size**2
            )
        self._state: dict[str, Tensor] | None = None
        self._cached_reconstruction: Tensor | None = None

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

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, C, H, W]`` to class scores (capsule lengths) ``[B, num_classes]``."""
        u = self.primary(x)
        u_hat = self.class_caps(u)
        v, couplings = dynamic_routing(
            u_hat, self.routing_iterations, detach=self.routing_detach, return_couplings=True
        )
        lengths = capsule_length(v)
        with torch.no_grad():
            # reduced now, so no [iterations, B, I, J] tensor outlives this forward (with 1000
            # classes at 224 px that would be gigabytes held until the next step)
            entropy = torch.stack([coupling_entropy(c) for c in couplings])
        # Kept for the hooks; v keeps its graph because the reconstruction loss trains through it.
        self._state = {
            "v": v,
            "lengths": lengths.detach(),
            "coupling_entropy": entropy,
            "primary_lengths": capsule_length(u.detach()),
        }
        self._cached_reconstruction = None
        return lengths

    def _latest(self) -> dict[str, Tensor]:
        if self._state is None:
            raise RuntimeError("CapsuleHead hooks read the latest forward; call forward first")
        return self._state

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

    def auxiliary_loss(self, images: Tensor, targets: Tensor) -> Tensor | None:
        """Reconstruction loss: squared error summed over each image, averaged over the batch.

        This is the paper's formulation, to which its weight of 0.0005 applies. The target has
        ``3 * s * s`` values per image (the paper had 28 * 28 = 784), which the weight should
        account for. Returns None when the head has no decoder.
        """
        if self.decoder is None:
            return None
        recon = self._reconstruct(self._latest()["v"], targets)
        self._cached_reconstruction = recon.detach()
        target = reconstruction_target(images, self.image_size)
        return (recon - target).pow(2).flatten(1).sum(dim=1).mean()

    def telemetry(self, targets: Tensor) -> dict[str, Tensor]:
        """Routing and capsule diagnostics of the latest forward, as detached 0-d tensors.

        ``capsule/inactive_input_fraction`` counts primary capsules shorter than
        ``INACTIVE_LENGTH`` (0.05).
        """
        state = self._latest()
        out = {
            f"capsule/coupling_entropy/iter{k + 1}": h
            for k, h in enumerate(state["coupling_entropy"].unbind())
        }
        lengths = state["lengths"]
        is_true = F.one_hot(targets.long(), self.num_classes).to(lengths.dtype)
        out["capsule/true_class_length"] = (lengths * is_true).sum() / is_true.sum()
        others = 1.0 - is_true
        out["capsule/other_class_length"] = (lengths * others).sum() / others.sum().clamp_min(1)
        inactive = (state["primary_lengths"] < INACTIVE_LENGTH).float()
        out["capsule/inactive_input_fraction"] = inactive.mean()
        return out

    @torch.no_grad()
    def images(self, images: Tensor, targets: Tensor) -> dict[str, Tensor]:
        """Up to 8 inputs (top row) above their reconstructions, as one grid ``[3, H, W]``."""
        if self.decoder is None:
            return {}
        count = min(GRID_IMAGES, images.shape[0])
        recon = self._cached_reconstruction
        if recon is None:
            # Only the decoder runs again, on at most 8 capsule sets: no second backbone pass.
            recon = self._reconstruct(self._latest()["v"][:count], targets[:count])
        inputs = reconstruction_target(images[:count], self.image_size)
        grid = make_grid(torch.cat([inputs, recon[:count].float()]), nrow=count, padding=2)
        return {"capsule/reconstruction": grid.clamp(0, 1)}
