"""The capsule head: primary capsules over the backbone feature map, class capsules by routing.

Layout (Sabour et al. 2017, adapted to a ResNet feature map instead of a 9x9 conv on pixels):

* primary capsules: a Conv2d producing ``types * dim`` channels; every (position, type) pair is an
  input capsule ``u_i`` (or, pooled, every type after averaging over positions);
* the routing that ``head.routing.name`` names (``capsexp.models.routing``) turns them into class
  capsules and class scores;
* optionally a decoder reconstructs the (downsampled) input from the true-class capsule.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import Tensor, nn
from torchvision.utils import make_grid

from capsexp.checks import Check, boolean, choice, integer, nonneg, one_of, positive
from capsexp.errors import UserError
from capsexp.models.capsule_layers import PrimaryCapsules
from capsexp.models.capsule_layers import capsule_length
from capsexp.models.capsules import coupling_entropy, entropy_deficit, relative_change
from capsexp.models.routing import CHECKS as ROUTING_CHECKS
from capsexp.models.routing import LOSSES_FOR_SCORE, POSE, ROUTINGS, Measured
from capsexp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from capsexp.models.heads import NOTHING, Head, HeadOutput, Measure

# A primary capsule shorter than this is counted as inactive in telemetry: after squashing,
# length 0.05 means |s| of about 0.23, i.e. a capsule that says almost nothing.
INACTIVE_LENGTH = 0.05
# How many inputs (with their reconstructions) the image grid shows.
GRID_IMAGES = 8


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
    """Primary capsules and class capsules by the routing ``head.routing.name`` names; the class
    score is that routing's (length, activation or logit), and an optional decoder reconstructs
    the input from the class capsules."""

    def __init__(self, cfg: Any, in_channels: int, feature_size: tuple[int, int], num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self.routing_name = str(cfg["routing"]["name"])
        self.routing = ROUTINGS[self.routing_name].build(cfg, in_channels, (*feature_size,), self.num_classes)
        decoder = cfg["decoder"]
        self.image_size = int(decoder["image_size"])
        self.auxiliary_weight = float(decoder["weight"])
        self.decoder: nn.Sequential | None = None
        if self.auxiliary_weight > 0 and self.routing_name == "self":
            raise ValueError("head.decoder.weight > 0 needs class-capsule poses, which head.routing.name=self "
                             "does not compute; set head.decoder.weight=0 or choose dynamic, attention or em.")
        if self.auxiliary_weight > 0:  # the decoder exists only when its loss counts
            width = self.num_classes * int(cfg["class_dim"] if self.routing_name != "em" else POSE * POSE)
            self.decoder = _decoder(width, list(decoder["hidden"]), 3 * self.image_size**2)

    @property
    def input_capsules(self) -> int | None:
        primary = self.routing.primary
        # every routing's primary capsules are a PrimaryCapsules, or hold one as ``pose``
        return int(cast(PrimaryCapsules, getattr(primary, "pose", primary)).num_capsules)

    @classmethod
    def from_config(cls, cfg_head: Any, in_channels: int, feature_size: tuple[int, int],
                    num_classes: int) -> CapsuleHead:
        """Build from the ``head`` config group (see ``conf/head/capsule.yaml``)."""
        return cls(cfg_head, in_channels, feature_size, num_classes)

    def forward(self, x: Tensor, measure: Measure = NOTHING) -> HeadOutput:
        """Features ``[B, C, H, W]`` to class scores ``[B, num_classes]``.

        ``extras``: the class capsules ``v`` (with their graph: the reconstruction loss trains
        through them); with ``measure.telemetry`` also the coupling entropy of every routing
        iteration and the primary capsules' presence (nothing is measured on other steps).
        """
        routed = self.routing(x, measure.telemetry)
        extras = {} if routed.capsules is None else {"v": routed.capsules}
        m = routed.measured
        if m is None:
            return HeadOutput(routed.scores, extras)
        with torch.no_grad():
            # reduced now, so no [iterations, B, I, J] tensor outlives this forward (with 1000
            # classes at 224 px that would be gigabytes held until the next step)
            extras["coupling_entropy"] = torch.stack([coupling_entropy(c) for c in m.couplings])
            extras |= routing_telemetry(m)
        if m.presence is not None:
            extras["presence"] = m.presence
        return HeadOutput(routed.scores, extras, m.hops)

    def _reconstruct(self, v: Tensor, scores: Tensor, targets: Tensor) -> Tensor:
        """Decode one class capsule per image (others masked to zero) to ``[B, 3, s, s]``.

        In training the true class's capsule, in evaluation the longest (the predicted class),
        as in the paper: at test time the label must not steer the reconstruction.
        """
        assert self.decoder is not None
        keep = targets if self.training else scores.detach().argmax(dim=-1)
        mask = F.one_hot(keep.long(), self.num_classes).to(v.dtype)
        flat = self.decoder((v * mask[..., None]).flatten(1))
        return flat.float().view(-1, 3, self.image_size, self.image_size)

    def auxiliary_loss(self, out: HeadOutput, images: Tensor, targets: Tensor,
                       draw: bool = False) -> tuple[Tensor, dict[str, Tensor]] | None:
        """Reconstruction loss: squared error summed over each image, averaged over the batch.

        This is the paper's formulation, to which its weight of 0.0005 applies. The target has
        ``3 * s * s`` values per image (the paper had 28 * 28 = 784), which ``head.decoder.weight``
        should account for. With ``draw``, also the grid ``capsule/reconstruction``: up to
        ``GRID_IMAGES`` inputs (top row) above their reconstructions. None without a decoder.
        """
        if self.decoder is None:
            return None
        recon = self._reconstruct(out.extras["v"], out.scores, targets)
        target = reconstruction_target(images, self.image_size)
        loss = (recon - target).pow(2).flatten(1).sum(dim=1).mean()
        return loss, (_grid(target[:GRID_IMAGES], recon[:GRID_IMAGES]) if draw else {})

    def telemetry(self, out: HeadOutput, targets: Tensor) -> dict[str, Tensor]:
        """Routing and capsule diagnostics, as detached 0-d tensors.

        ``capsule/inactive_input_fraction`` counts primary capsules shorter than ``INACTIVE_LENGTH``
        (0.05), or with an activation below it (self and EM routing); attention routing has none.
        ``capsule/true_class_length`` and ``other_class_length`` are the class scores: lengths,
        activations or logits, whichever the routing's score is.
        """
        out_ = {
            f"capsule/coupling_entropy/iter{k + 1}": h
            for k, h in enumerate(out.extras["coupling_entropy"].unbind())
        }
        out_ |= {k: v for k, v in out.extras.items() if k.startswith("routing/")}
        lengths = out.scores.detach()
        is_true = F.one_hot(targets.long(), self.num_classes).to(lengths.dtype)
        out_["capsule/true_class_length"] = (lengths * is_true).sum() / is_true.sum()
        others = 1.0 - is_true
        out_["capsule/other_class_length"] = (lengths * others).sum() / others.sum().clamp_min(1)
        if "presence" in out.extras:  # lengths or activations; attention's LayerNorm'd capsules have none
            out_["capsule/inactive_input_fraction"] = (out.extras["presence"] < INACTIVE_LENGTH).float().mean()
        return out_


def routing_telemetry(m: Measured) -> dict[str, Tensor]:
    """``routing/*``: what routing did in this forward, as 0-d tensors (see docs/gradient-diagnostics.md).

    ``entropy_deficit``: the last couplings' divergence from the uniform ones (``log J - H``);
    ``max_coupling``: the largest coupling; ``change``: ``||out_r - out_1|| / ||out_1||``, the routing's
    output against the same layer's with uniform couplings; ``gain``: the mean class-capsule length
    (or activation) over its uniform-coupling value. All exactly 0 (gain 1) with one iteration.
    """
    def size(out: Tensor) -> Tensor:  # class capsules [B, J, D] by their lengths; activations as they are
        return capsule_length(out) if out.dim() == 3 else out

    last = m.couplings[-1]
    return {"routing/entropy_deficit": entropy_deficit(last, m.uniform_couplings),
            "routing/max_coupling": last.max(),
            "routing/change": relative_change(m.output, m.uniform_output),
            "routing/gain": size(m.output).mean() / size(m.uniform_output).mean().clamp_min(1e-30)}


@torch.no_grad()
def _grid(inputs: Tensor, recon: Tensor) -> dict[str, Tensor]:
    """Inputs (top row) above their reconstructions, as one grid ``[3, H, W]`` in [0, 1]."""
    grid = make_grid(torch.cat([inputs.float(), recon.float()]), nrow=inputs.shape[0], padding=2)
    return {"capsule/reconstruction": grid.clamp(0, 1)}


def _hidden(v: Any) -> bool:
    return OmegaConf.is_list(v) and all(integer(1)(h) for h in v)


CHECKS: list[Check] = [
    ("head.routing.name", choice(*ROUTINGS), one_of(ROUTINGS)),
    *ROUTING_CHECKS,
    ("head.routing.detach", boolean, "true or false"),
    ("head.primary.types", integer(1), "a positive integer"),
    ("head.primary.dim", integer(1), "a positive integer"),
    ("head.primary.kernel_size", integer(1), "a positive integer"),
    ("head.primary.stride", integer(1), "a positive integer"),
    ("head.primary.pooled", boolean, "true or false"),
    ("head.class_dim", integer(1), "a positive integer"),
    ("head.init_std", positive(), "a positive number"),
    ("head.share_weights", boolean, "true or false"),
    ("head.decoder.weight", nonneg, "a number >= 0 (0 = no decoder)"),
    ("head.decoder.hidden", _hidden, "a list of positive integers, e.g. [512,1024]"),
    ("head.decoder.image_size", integer(1), "a positive integer"),
]


def cross_check(cfg: Any) -> None:
    """A loss that cannot take the routing's class score, or a decoder without class capsules:
    refused before the run starts."""
    if cfg.head.name != "capsule":
        return
    name = str(cfg.head.routing.name)
    option = ROUTINGS[name]
    allowed = LOSSES_FOR_SCORE[option.score]
    if str(cfg.loss.name) not in allowed:
        raise UserError(f"loss={cfg.loss.name} cannot take head.routing.name={name}'s class scores "
                        f"({option.score}s); use loss={one_of(allowed)}, or leave loss out for its "
                        f"default, loss={option.default_loss}.")
    if float(cfg.head.decoder.weight) > 0 and name == "self":
        raise UserError("head.decoder.weight > 0 needs class-capsule poses, which head.routing.name=self does "
                        "not compute; set head.decoder.weight=0 or choose dynamic, attention or em.")
