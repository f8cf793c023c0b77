"""The routing registry: ``head.routing.name`` -> the capsule layers of that paper.

Each routing brings its own primary-capsule form, class score and default loss, as its paper
has them; the backbone, adapter, optimizer and every diagnostic stay the same. Every layer maps
the feature map ``[B, C, H, W]`` to a ``Routed``: class scores ``[B, J]``, and, on request, the
couplings of every iteration and the primary capsules' presence (length or activation).

| name        | paper                 | primary capsules                        | class score          |
|-------------|-----------------------|-----------------------------------------|----------------------|
| ``dynamic`` | Sabour et al. 2017    | conv (optional BatchNorm), squash       | length of ``v_j``    |
| ``attention``| Tsai et al. 2020     | conv without bias, LayerNorm            | shared linear of ``v_j`` |
| ``self``    | Hahn et al. 2019      | pose BatchNorm(conv), a = sigmoid(BN(conv)) | ``a_j``          |
| ``em``      | Hinton et al. 2018    | 4x4 pose matrices, sigmoid activations  | ``a_j``              |
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor, nn

from capsexp.checks import Check, boolean, integer, positive
from capsexp.models.capsule_layers import ClassCapsules, PrimaryCapsules, capsule_length
from capsexp.models.capsules import squash
from capsexp.models.routing_algorithms import attention_routing, dynamic_routing, em_routing, self_routing


class Routed(NamedTuple):
    """One forward of a routing layer."""

    scores: Tensor                # [B, J]: lengths, activations in (0, 1), or logits (see ``SCORE``)
    capsules: Tensor | None       # class capsules [B, J, D] with their graph (the decoder reads them)
    couplings: Tensor | None      # [iterations, B, I, J], detached, only when asked for
    presence: Tensor | None       # [B, I]: primary capsule length or activation, only when asked for


def _primary(cfg: Any, in_channels: int, feature_size: tuple[int, int], dim: int | None = None,
             bias: bool = True, norm: bool = False) -> PrimaryCapsules:
    p = cfg["primary"]
    # a bias before BatchNorm does nothing (training subtracts the batch mean): none there
    return PrimaryCapsules(in_channels, feature_size, int(p["types"]), int(dim or p["dim"]), int(p["kernel_size"]),
                           int(p["stride"]), bool(p["pooled"]), bias=bias and not norm, norm=norm)


class DynamicRouting(nn.Module):
    """Sabour et al. 2017: squashed primary capsules, votes ``W_ij u_i``, Procedure 1, lengths."""

    def __init__(self, cfg: Any, in_channels: int, feature_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        routing = cfg["routing"]
        self.iterations, self.detach = int(routing["iterations"]), bool(routing["detach"])
        self.logit_scale = float(routing["logit_scale"])
        self.primary = _primary(cfg, in_channels, feature_size, norm=bool(cfg["primary"]["norm"]))
        self.class_caps = ClassCapsules(self.primary.num_capsules, self.primary.types, num_classes,
                                        int(cfg["class_dim"]), self.primary.dim, float(cfg["init_std"]),
                                        bool(cfg["share_weights"]))

    def forward(self, x: Tensor, measure: bool) -> Routed:
        u = squash(self.primary(x))
        u_hat = self.class_caps(u)
        if not measure:
            v = dynamic_routing(u_hat, self.iterations, self.detach, self.logit_scale)
            return Routed(capsule_length(v), v, None, None)
        v, c = dynamic_routing(u_hat, self.iterations, self.detach, self.logit_scale, return_couplings=True)
        return Routed(capsule_length(v), v, c, capsule_length(u.detach()))


class AttentionRouting(nn.Module):
    """Tsai et al. 2020: LayerNorm'd primary capsules, inverted dot-product attention, a shared
    linear map of each class capsule to its logit."""

    def __init__(self, cfg: Any, in_channels: int, feature_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.iterations = int(cfg["routing"]["iterations"])
        self.primary = _primary(cfg, in_channels, feature_size, bias=False)
        self.primary_norm = nn.LayerNorm(self.primary.dim)
        inputs, dim = self.primary.num_capsules, int(cfg["class_dim"])
        # the paper's initialisation: the votes' sum over I inputs keeps unit scale per class
        std = math.sqrt(num_classes / (self.primary.dim * inputs))
        self.class_caps = ClassCapsules(inputs, self.primary.types, num_classes, dim, self.primary.dim, std,
                                        bool(cfg["share_weights"]))
        self.norm = nn.LayerNorm(dim)
        # shared by every class capsule; no bias: a shift common to all classes means nothing to a softmax
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, x: Tensor, measure: bool) -> Routed:
        u = self.primary_norm(self.primary(x))
        u_hat = self.class_caps(u)
        if not measure:
            v = attention_routing(u_hat, self.iterations, norm=self.norm)
            return Routed(self.score(v).squeeze(-1), v, None, None)
        v, c = attention_routing(u_hat, self.iterations, norm=self.norm, return_couplings=True)
        # a LayerNorm'd capsule has length about sqrt(d) whatever it says: no presence to measure
        return Routed(self.score(v).squeeze(-1), v, c, None)


class _PoseAndActivation(nn.Module):
    """SR-CapsNet's primary capsules: pose = BatchNorm(conv), activation = sigmoid(BatchNorm(conv))."""

    def __init__(self, cfg: Any, in_channels: int, feature_size: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.pose = _primary(cfg, in_channels, feature_size, dim=dim, norm=True)
        self.activation = _primary(cfg, in_channels, feature_size, dim=1, norm=True)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.pose(x), torch.sigmoid(self.activation(x)).squeeze(-1)


class SelfRouting(nn.Module):
    """Hahn et al. 2019: each input capsule routes itself, ``c_ij = softmax_j(W^r_i u_i + b^r_i)``
    (W^r and b^r start at zero: uniform couplings), ``a_j = sum_i a_i c_ij / sum_i a_i``. No iterations."""

    def __init__(self, cfg: Any, in_channels: int, feature_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.primary = _PoseAndActivation(cfg, in_channels, feature_size, int(cfg["primary"]["dim"]))
        inputs, dim = self.primary.pose.num_capsules, self.primary.pose.dim
        self.weight = nn.Parameter(torch.zeros(inputs, num_classes, dim))
        self.bias = nn.Parameter(torch.zeros(inputs, num_classes))

    def forward(self, x: Tensor, measure: bool) -> Routed:
        pose, a = self.primary(x)
        if not measure:
            return Routed(self_routing(pose, a, self.weight, self.bias), None, None, None)
        a_out, c = self_routing(pose, a, self.weight, self.bias, return_couplings=True)
        return Routed(a_out, None, c, a.detach())


POSE = 4  # EM routing's pose matrices are 4 x 4


class EMRouting(nn.Module):
    """Hinton et al. 2018: 4x4 pose matrices, votes ``M_i W_ij``, EM routing with the inverse-temperature
    schedule, learned ``beta_u`` and ``beta_a`` per class; the score is the class activation."""

    def __init__(self, cfg: Any, in_channels: int, feature_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        routing = cfg["routing"]
        self.iterations, self.final_lambda = int(routing["iterations"]), float(routing["final_lambda"])
        self.primary = _PoseAndActivation(cfg, in_channels, feature_size, POSE * POSE)
        inputs, types = self.primary.pose.num_capsules, self.primary.pose.types
        self.share = bool(cfg["share_weights"])
        rows = types if self.share else inputs
        self.types = types
        self.weight = nn.Parameter(torch.randn(rows, num_classes, POSE, POSE) * float(cfg["init_std"]))
        self.beta_u = nn.Parameter(torch.zeros(num_classes))
        self.beta_a = nn.Parameter(torch.zeros(num_classes))

    def votes(self, pose: Tensor) -> Tensor:
        """Pose matrices ``[B, I, 16]`` to votes ``[B, I, J, 16]``: ``V_ij = M_i W_ij``."""
        batch, inputs, _ = pose.shape
        m = pose.view(batch, inputs, POSE, POSE)
        if not self.share:
            return torch.einsum("bixy,ijyz->bijxz", m, self.weight).flatten(-2)
        by_type = m.view(batch, inputs // self.types, self.types, POSE, POSE)
        votes = torch.einsum("bptxy,tjyz->bptjxz", by_type, self.weight)
        return votes.reshape(batch, inputs, -1, POSE * POSE)

    def forward(self, x: Tensor, measure: bool) -> Routed:
        pose, a = self.primary(x)
        votes = self.votes(pose)
        if not measure:
            out, a_out = em_routing(votes, a, self.beta_u, self.beta_a, self.iterations, self.final_lambda)
            return Routed(a_out, out, None, None)
        out, a_out, c = em_routing(votes, a, self.beta_u, self.beta_a, self.iterations, self.final_lambda,
                                   return_couplings=True)
        return Routed(a_out, out, c, a.detach())


class RoutingOption(NamedTuple):
    """One ``head.routing.name``: its layers, its class score, its default loss and whether
    ``head.routing.iterations`` applies."""

    build: Callable[[Any, int, tuple[int, int], int], nn.Module]
    score: str           # "length", "logit" or "activation"
    default_loss: str    # the paper's loss; an explicit loss= still wins
    iterations: bool
    summary: str


ROUTINGS: dict[str, RoutingOption] = {
    "dynamic": RoutingOption(DynamicRouting, "length", "margin", True,
                             "Sabour et al. 2017, routing by agreement; score = capsule length"),
    "attention": RoutingOption(AttentionRouting, "logit", "ce", True,
                               "Tsai et al. 2020, inverted dot-product attention; score = shared linear logit"),
    "self": RoutingOption(SelfRouting, "activation", "ce", False,
                          "Hahn et al. 2019, self-routing (no iterations); score = activation"),
    "em": RoutingOption(EMRouting, "activation", "spread", True,
                        "Hinton et al. 2018, EM routing of 4x4 pose matrices; score = activation"),
}
# the losses each kind of class score can feed: margin and spread losses want bounded scores
LOSSES_FOR_SCORE = {"length": ("margin", "spread", "ce"), "activation": ("margin", "spread", "ce"),
                    "logit": ("ce",)}

CHECKS: list[Check] = [
    ("head.routing.logit_scale", positive(), "a positive number"),
    ("head.routing.final_lambda", positive(), "a positive number"),
    ("head.primary.norm", boolean, "true or false"),
    ("head.routing.iterations", integer(1), "an integer >= 1"),
]
