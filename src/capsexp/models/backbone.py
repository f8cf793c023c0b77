"""The ResNet trunk: a torchvision ResNet cut before global pooling, its weights, its freezing.

Every option of the ``backbone`` group (``BACKBONES``) has the same stem + layer1..layer4
structure and five stride-2 halvings; only the channels of the feature map differ.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable, Sequence, cast

import torch
from omegaconf import OmegaConf
import torchvision
from torch import Tensor, nn

from capsexp.rundir.checkpoint import read_torch_file
from capsexp.checks import Check, integer, one_of
from capsexp.models.stages import BACKBONE_STAGES
from capsexp.errors import UserError

STAGES = BACKBONE_STAGES  # the backbone's own stages, from the input
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d",
             "wide_resnet50_2")
# the names each architecture's torchvision weights enum has (resnet18/34: IMAGENET1K_V1 only);
# read from the enums, which are metadata: nothing is downloaded here
WEIGHTS: dict[str, tuple[str, ...]] = {
    arch: (*(w.name for w in torchvision.models.get_model_weights(arch)), "DEFAULT") for arch in BACKBONES
}
_LAYER = re.compile(r"^layer(\d+)$")
_WEIGHTS_NAME = re.compile(r"^[A-Z][A-Z0-9_]*$")  # how torchvision spells a weights name


def _is_weights_name(value: str) -> bool:
    """``IMAGENET1K_V2``-like and not an existing file: meant as a torchvision weights name."""
    return _WEIGHTS_NAME.match(value) is not None and not Path(value).exists()


def _weights_for(arch: str) -> tuple[Callable[[Any], bool], str]:
    """The predicate and allowed-phrase of ``backbone.weights`` for one architecture."""
    names = WEIGHTS[arch]

    def ok(v: Any) -> bool:
        return v is None or isinstance(v, str) and (not _is_weights_name(v) or v in names)
    return ok, f"null, {one_of(names)} (torchvision's {arch} weights), or a file path"


CHECKS: list[Check] = [
    # read before anything runs, so a preset's required value (capsexp_required) fails first
    ("backbone.weights", lambda v: v is None or isinstance(v, str),
     "null, a torchvision weights name such as IMAGENET1K_V1, or a file path"),
    ("backbone.freeze_depth", integer(0, 5), "an integer from 0 to 5"),
    ("backbone.reinit", lambda v: (OmegaConf.is_list(v) or isinstance(v, (list, tuple)))
     and all(s in BACKBONE_STAGES for s in v) and len(set(v)) == len(v),
     f"a list of distinct stages drawn from {', '.join(BACKBONE_STAGES)}, e.g. [stem,layer1] ([] for none)"),
]


def cross_check(cfg: Any) -> None:
    """A re-initialised stage must train: one that freeze_depth freezes would stay random."""
    frozen = set(BACKBONE_STAGES[:int(cfg.backbone.freeze_depth)])
    clash = [s for s in cfg.backbone.reinit if s in frozen]
    if clash:
        raise UserError(f"backbone.reinit names {', '.join(clash)}, which backbone.freeze_depth="
                        f"{cfg.backbone.freeze_depth} freezes, so it would stay random; lower freeze_depth "
                        f"or leave {', '.join(clash)} out of backbone.reinit.")


def reinit_stages(backbone: "Backbone", stages: Sequence[str]) -> None:
    """Re-initialise ``stages`` of a (pretrained) trunk with torchvision's own initialisation, as a
    fresh trunk of the same architecture gets it (conv: Kaiming normal, fan-out; BatchNorm: 1 and 0,
    running statistics reset; the last BatchNorm of each block zero, as capsexp's fresh trunks),
    drawn anew from the global generator. Everything else keeps its loaded weights."""
    if not stages:
        return
    fresh = Backbone(torchvision.models.get_model(backbone.arch, weights=None, zero_init_residual=True),
                     backbone.arch)
    for name in stages:
        backbone.stages()[name].load_state_dict(fresh.stages()[name].state_dict())
# a weights name the chosen architecture lacks fails here, before any download is tried
OPTION_CHECKS: dict[str, list[Check]] = {
    arch: [("backbone.weights", *_weights_for(arch))] for arch in BACKBONES
}


def feature_size(image_size: int) -> int:
    """Side of the ``[B, C, h, h]`` feature map for a square input: five stride-2 halvings."""
    size = image_size
    for _ in range(5):
        size = (size + 1) // 2  # every stride-2 convolution/pool here rounds up
    return size


class Backbone(nn.Module):
    """A ResNet without ``avgpool``/``fc``; returns the ``[B, out_channels, H/32, W/32]`` feature map.

    Children keep torchvision's names (``conv1``, ``bn1``, ``layer1``...), so torchvision state
    dicts load directly. Stages are read from that structure: everything before the first
    ``layer<N>`` child is the stem, each ``layer<N>`` is one stage.
    """

    def __init__(self, resnet: nn.Module, arch: str, freeze_depth: int = 0) -> None:
        super().__init__()
        self.arch = arch
        # what the architecture's own classifier reads: 512 for resnet18/34, 2048 for the others
        self.out_channels = int(cast(nn.Linear, resnet.fc).in_features)
        for name, child in resnet.named_children():
            if name not in ("avgpool", "fc"):
                self.add_module(name, child)
        self.freeze_depth = freeze_depth
        # built once; a plain dict attribute, so no module is registered twice in the state dict
        self._stages = self._read_stages()
        for stage in list(self._stages.values())[:freeze_depth]:
            stage.requires_grad_(False)

    def stages(self) -> "OrderedDict[str, nn.Module]":
        """``stem, layer1..layer4`` as modules (the stem is a view over the leading children)."""
        return self._stages

    def _read_stages(self) -> "OrderedDict[str, nn.Module]":
        stem: dict[str, nn.Module] = {}
        out: OrderedDict[str, nn.Module] = OrderedDict()
        for name, child in self.named_children():
            if _LAYER.match(name):
                if stem and "stem" not in out:
                    out["stem"] = nn.ModuleDict(stem)
                out[name] = child
            elif "stem" not in out:
                stem[name] = child
        return out

    def train(self, mode: bool = True) -> "Backbone":
        super().train(mode)
        # frozen stages keep their BatchNorm running statistics: eval mode whatever the caller says
        for stage in list(self._stages.values())[: self.freeze_depth]:
            stage.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        for index, stage in enumerate(self._stages.values()):
            modules = stage.values() if isinstance(stage, nn.ModuleDict) else [stage]
            # nothing before a frozen stage is trainable, so no graph is needed through it
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.freeze_depth):
                for module in modules:
                    x = module(x)
        return x


def build_backbone(cfg: Any, with_weights: bool = True) -> Backbone:
    """Build the trunk from the ``backbone`` config group: architecture, freezing, then weights.

    ``with_weights=False`` stops before any file or download is read, so a caller can size what
    follows from ``out_channels`` and fail early; ``load_weights`` finishes the job.
    """
    arch = str(cfg.name)
    # zero-initialised last BN of each residual block: a random-init trunk starts as a shallow
    # network with well-scaled outputs (Goyal et al. 2017); loaded weights overwrite it anyway
    resnet = torchvision.models.get_model(arch, weights=None, zero_init_residual=True)
    backbone = Backbone(resnet, arch, freeze_depth=int(cfg.freeze_depth))
    if not with_weights:
        return backbone
    backbone = load_weights(backbone, cfg.weights)
    reinit_stages(backbone, list(cfg.get("reinit", [])))
    return backbone


def load_weights(backbone: Backbone, weights: str | None) -> Backbone:
    """Load ``weights`` (null, a torchvision weights name or a file) into the trunk; return it."""
    if weights is None:
        return backbone
    source = str(weights)
    ok, allowed = _weights_for(backbone.arch)
    if not ok(source):
        raise UserError(f"backbone.weights={source!r} is not allowed; it must be {allowed}.")
    state = _torchvision_state(backbone.arch, source) if _is_weights_name(source) \
        else _file_state(source, backbone.arch)
    _load_trunk(backbone, state, source)
    return backbone


def _torchvision_state(arch: str, name: str) -> dict[str, Tensor]:
    weights = torchvision.models.get_model_weights(arch)[name]  # the name was checked: no KeyError
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, hash mismatch, partial download...
        hub = torch.hub.get_dir()
        raise UserError(
            f"backbone.weights: could not get torchvision's {arch} {name} weights ({type(exc).__name__}); "
            f"run once with network access so they are cached under {hub}/checkpoints, "
            f"or pass a local file with backbone.weights=/path/to/weights.pt, or use backbone.weights=null."
        ) from None


def _file_state(path: str, arch: str) -> dict[str, Tensor]:
    names = one_of(WEIGHTS[arch])
    obj = read_torch_file(
        path, "backbone.weights",
        "no file at '{path}'; pass an existing state_dict or capsexp checkpoint, "
        f"one of torchvision's {arch} weights ({names}), or null for random init.",
        "'{path}' is not a readable PyTorch state_dict or capsexp checkpoint ({error}).")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a capsexp checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"backbone.weights: '{path}' holds no state_dict of tensors.")
    return obj


def _load_trunk(backbone: Backbone, state: dict[str, Tensor], source: str) -> None:
    """Load the trunk's tensors from torchvision, plain, DDP (``module.``) or capsexp (``backbone.``) keys."""
    trunk = backbone.state_dict()  # torchvision's names, less ``fc``: a torchvision file's ``fc.*`` is ignored
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key in trunk:
            cleaned[key] = value
    # num_batches_tracked is a counter, not a weight, and files saved before PyTorch 0.4.1 lack it:
    # BatchNorm fills it in when it is absent
    missing = [k for k in trunk if k not in cleaned and not k.endswith("num_batches_tracked")]
    wrong = [k for k, v in cleaned.items() if tuple(v.shape) != tuple(trunk[k].shape)]
    if missing or wrong:
        bad = (missing or wrong)[0]
        raise UserError(
            f"backbone.weights: '{source}' does not fit {backbone.arch} ({len(missing)} tensors missing, "
            f"{len(wrong)} of the wrong shape, e.g. '{bad}')."
        )
    # non-finite weights would make the first loss NaN, and the stop would blame the learning rate
    poisoned = next((k for k, v in cleaned.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())),
                    None)
    if poisoned is not None:
        raise UserError(f"backbone.weights: '{source}' holds NaN or infinite values (first in '{poisoned}'); "
                        f"use weights from a run that finished, or null for random init.")
    backbone.load_state_dict(cleaned)
