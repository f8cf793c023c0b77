"""Adapters between the ResNet50 feature map and a head; usable with every head so comparisons are fair."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from capsexp.errors import UserError

ADAPTERS = ("none", "conv", "linear")
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise UserError(f"adapter.activation must be one of {', '.join(_ACTIVATIONS)}; got '{name}'.")
    return _ACTIVATIONS[name]()


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise UserError(f"adapter.norm must be one of batch, group, none; got '{kind}'.")


class Adapter(nn.Module):
    """A feature map ``[B, C, H, W]`` in, a feature map ``[B, out_channels, h, w]`` out."""

    out_channels: int

    def out_size(self, size: int) -> int:
        return size


class IdentityAdapter(Adapter):
    """``adapter=none``: the raw 2048-channel map goes straight into the head."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return x


class ConvAdapter(Adapter):
    """1x1 convolution down to ``width``, normalisation, non-linearity, optionally a 3x3 block."""

    def __init__(self, in_channels: int, width: int, norm: str = "batch", activation: str = "relu",
                 conv3x3: bool = False) -> None:
        super().__init__()
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1, bias=bias), _norm(norm, width),
                                   _activation(activation)]
        if conv3x3:
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=bias), _norm(norm, width),
                       _activation(activation)]
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class LinearAdapter(Adapter):
    """Pooled features through a fully connected layer: a ``[B, width, 1, 1]`` map.

    The capsule head turns that map into primary capsules with its 1x1 primary convolution.
    """

    def __init__(self, in_channels: int, width: int, activation: str = "relu") -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, width)
        self.act = _activation(activation)
        self.out_channels = width

    def out_size(self, size: int) -> int:
        return 1

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.fc(self.pool(x).flatten(1)))
        return y[:, :, None, None]


def build_adapter(cfg: Any, in_channels: int) -> Adapter:
    """Build the adapter named by ``cfg.name`` (the ``adapter`` config group)."""
    if cfg.name == "none":
        return IdentityAdapter(in_channels)
    width = int(cfg.width)
    if width < 1:
        raise UserError(f"adapter.width must be a positive integer; got {cfg.width}.")
    if cfg.name == "conv":
        return ConvAdapter(in_channels, width, cfg.norm, cfg.activation, bool(cfg.conv3x3))
    if cfg.name == "linear":
        return LinearAdapter(in_channels, width, cfg.activation)
    raise UserError(f"adapter must be one of {', '.join(ADAPTERS)}; got '{cfg.name}'.")
