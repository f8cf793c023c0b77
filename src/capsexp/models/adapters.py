"""Adapters between the backbone feature map and a head; usable with every head so comparisons are fair."""

from __future__ import annotations

from typing import Any, Callable

from torch import Tensor, nn

from capsexp.checks import Check, boolean, choice, integer, one_of

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}


def _group_norm(channels: int) -> nn.Module:
    return nn.GroupNorm(next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0), channels)


NORMS: dict[str, Callable[[int], nn.Module]] = {"batch": nn.BatchNorm2d, "group": _group_norm,
                                                "none": lambda channels: nn.Identity()}
_WIDTH: Check = ("adapter.width", integer(1), "a positive integer")
_ACTIVATION: Check = ("adapter.activation", choice(*ACTIVATIONS), one_of(ACTIVATIONS))
OPTION_CHECKS: dict[str, list[Check]] = {
    "conv": [_WIDTH, ("adapter.norm", choice(*NORMS), one_of(NORMS)), _ACTIVATION,
             ("adapter.conv3x3", boolean, "true or false")],
    "linear": [_WIDTH, _ACTIVATION],
    "pool": [("adapter.size", integer(1), "a positive integer (the side of the pooled map)")],
}


class Adapter(nn.Module):
    """A feature map ``[B, C, H, W]`` in, a feature map ``[B, out_channels, h, w]`` out."""

    out_channels: int

    def out_size(self, size: int) -> int:
        return size


class IdentityAdapter(Adapter):
    """``adapter=none``: the raw backbone map goes straight into the head."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.out_channels = in_channels

    def forward(self, x: Tensor) -> Tensor:
        return x


class ConvAdapter(Adapter):
    """1x1 convolution down to ``width``, normalisation, non-linearity, optionally a 3x3 block."""

    def __init__(self, in_channels: int, width: int, norm: str, activation: str, conv3x3: bool) -> None:
        super().__init__()
        bias = norm == "none"
        layers: list[nn.Module] = [nn.Conv2d(in_channels, width, 1, bias=bias), NORMS[norm](width),
                                   ACTIVATIONS[activation]()]
        if conv3x3:
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=bias), NORMS[norm](width),
                       ACTIVATIONS[activation]()]
        self.body = nn.Sequential(*layers)
        self.out_channels = width

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


class LinearAdapter(Adapter):
    """Pooled features through a fully connected layer: a ``[B, width, 1, 1]`` map.

    The capsule head turns that map into primary capsules with its 1x1 primary convolution.
    """

    def __init__(self, in_channels: int, width: int, activation: str) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, width)
        self.act = ACTIVATIONS[activation]()
        self.out_channels = width

    def out_size(self, size: int) -> int:
        return 1

    def forward(self, x: Tensor) -> Tensor:
        y = self.act(self.fc(self.pool(x).flatten(1)))
        return y[:, :, None, None]


class PoolAdapter(Adapter):
    """Average pooling of the map to ``size x size`` (no parameters): fewer positions, so fewer
    primary capsules, with the backbone's channels untouched; a map already that small is kept."""

    def __init__(self, in_channels: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.out_channels = in_channels

    def out_size(self, size: int) -> int:
        return min(size, self.size)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.adaptive_avg_pool2d(x, self.out_size(x.shape[-1]))


# the options of the ``adapter`` group: name -> builder from (group config, input channels)
ADAPTERS: dict[str, Callable[[Any, int], Adapter]] = {
    "none": lambda cfg, c: IdentityAdapter(c),
    "conv": lambda cfg, c: ConvAdapter(c, int(cfg.width), cfg.norm, cfg.activation, bool(cfg.conv3x3)),
    "linear": lambda cfg, c: LinearAdapter(c, int(cfg.width), cfg.activation),
    "pool": lambda cfg, c: PoolAdapter(c, int(cfg.size)),
}


def build_adapter(cfg: Any, in_channels: int) -> Adapter:
    """Build the adapter named by ``cfg.name`` (the ``adapter`` config group, already validated)."""
    return ADAPTERS[cfg.name](cfg, in_channels)
