"""The capsule layers every routing builds on: primary capsules over a feature map and the
transformation matrices that turn them into votes for the class capsules."""

from __future__ import annotations

import torch
from torch import Tensor, nn


# Added under the square root of the capsule length so its gradient is finite at v = 0.
LENGTH_EPS = 1e-8


def capsule_length(v: Tensor) -> Tensor:
    """Length of capsules along the last axis, ``sqrt(sum v^2 + eps)`` (finite gradient at 0)."""
    return torch.sqrt(v.pow(2).sum(dim=-1) + LENGTH_EPS)


class PrimaryCapsules(nn.Module):
    """Conv2d to ``types * dim`` channels (optionally BatchNorm), reshaped into capsules ``[B, I, dim]``.

    Capsule ``i`` is ordered position-major: ``i = position * types + type``. The kernel is
    clipped to the feature-map size so that a 1x1 map (32 px input to a ResNet50) works. The
    output is the raw pose, before the squash or normalisation that each routing applies itself.
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
        bias: bool = True,
        norm: bool = False,
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
        self.conv = nn.Conv2d(in_channels, self.types * self.dim, kernel_hw, stride=stride, bias=bias)
        self.norm: nn.Module = nn.BatchNorm2d(self.types * self.dim) if norm else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Features ``[B, C, H, W]`` to primary capsules ``[B, I, dim]`` (not yet squashed)."""
        if tuple(x.shape[-2:]) != self.feature_size:
            raise ValueError(
                f"the capsule head was built for {self.feature_size[0]}x{self.feature_size[1]} "
                f"feature maps; got {x.shape[-2]}x{x.shape[-1]}"
            )
        out = self.norm(self.conv(x))
        batch = out.shape[0]
        if self.pooled:
            capsules = out.mean(dim=(2, 3)).view(batch, self.types, self.dim)
        else:
            capsules = out.view(batch, self.types, self.dim, self.positions)
            capsules = capsules.permute(0, 3, 1, 2).reshape(batch, self.num_capsules, self.dim)
        return capsules


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


