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
from capsexp.models.routing_algorithms import (attention_routing, dynamic_routing, dynamic_routing_sum, em_routing,
                                               self_routing)


class Measured(NamedTuple):
    """What a routing layer computes besides its output on a logging step (never in evaluation)."""

    couplings: Tensor             # [iterations, B, I, J], detached
    uniform_couplings: Tensor     # [B, I, J]: what the routing starts from (no routing decision)
    output: Tensor                # the routing's output: class capsules [B, J, D], or activations [B, J]
    uniform_output: Tensor        # the same with uniform couplings, computed without gradient
    presence: Tensor | None       # [B, I]: primary capsule length or activation; None where it means nothing
    hops: dict[str, Tensor]       # the activations between the scores and the layer's input, in order


class Routed(NamedTuple):
    """One forward of a routing layer."""

    scores: Tensor                # [B, J]: lengths, activations in (0, 1), or logits (see ``RoutingOption.score``)
    capsules: Tensor | None       # class capsules [B, J, D] with their graph (the decoder reads them)
    measured: Measured | None     # only when asked for


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
        raw = self.primary(x)
        u = squash(raw)
        u_hat = self.class_caps(u)
        if not measure:
            v = dynamic_routing(u_hat, self.iterations, self.detach, self.logit_scale)
            return Routed(capsule_length(v), v, None)
        s, c = dynamic_routing_sum(u_hat, self.iterations, self.detach, self.logit_scale)
        v = squash(s)
        scores = capsule_length(v)
        with torch.no_grad():
            v1 = squash(dynamic_routing_sum(u_hat.detach(), 1, return_couplings=False)[0])
        hops = {"scores": scores, "class_capsules": v, "presquash": s, "votes": u_hat, "primary": u,
                "primary_presquash": raw}
        return Routed(scores, v, Measured(c, c[0], v.detach(), v1, capsule_length(u.detach()), hops))


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
        raw = self.primary(x)
        u = self.primary_norm(raw)
        u_hat = self.class_caps(u)
        if not measure:
            v = attention_routing(u_hat, self.iterations, norm=self.norm)
            return Routed(self.score(v).squeeze(-1), v, None)
        sums: list[Tensor] = []  # the routing's weighted sums before the norm; the last is the output's

        def norm(s: Tensor) -> Tensor:
            sums.append(s)
            return self.norm(s)

        v, c = attention_routing(u_hat, self.iterations, norm=norm, return_couplings=True)
        scores = self.score(v).squeeze(-1)
        with torch.no_grad():
            v1 = attention_routing(u_hat.detach(), 1, norm=self.norm)
        hops = {"scores": scores, "class_capsules": v, "prenorm": sums[-1], "votes": u_hat, "primary": u,
                "primary_prenorm": raw}
        # a LayerNorm'd capsule has length about sqrt(d) whatever it says: no presence to measure
        return Routed(scores, v, Measured(c, c[0], v.detach(), v1, None, hops))


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
            return Routed(self_routing(pose, a, self.weight, self.bias), None, None)
        a_out, c = self_routing(pose, a, self.weight, self.bias, return_couplings=True)
        # uniform couplings (W^r = b^r = 0, as at the start) give every class 1/J exactly
        uniform, a_uniform = torch.full_like(c[0], 1.0 / c.shape[-1]), torch.full_like(a_out, 1.0 / c.shape[-1])
        hops = {"scores": a_out, "activation": a, "pose": pose}
        return Routed(a_out, None, Measured(c, uniform, a_out.detach(), a_uniform.detach(), a.detach(), hops))


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
            return Routed(a_out, out, None)
        out, a_out, c = em_routing(votes, a, self.beta_u, self.beta_a, self.iterations, self.final_lambda,
                                   return_couplings=True)
        with torch.no_grad():  # one M-step from R = 1/J: the class poses with no routing decision
            out1, _ = em_routing(votes.detach(), a.detach(), self.beta_u, self.beta_a, 1, self.final_lambda)
        hops = {"scores": a_out, "votes": votes, "activation": a, "pose": pose}
        return Routed(a_out, out, Measured(c, c[0], out.detach(), out1, a.detach(), hops))


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
