"""The ResNet50 trunk: torchvision's resnet50 cut before global pooling, its weights, its freezing."""

from __future__ import annotations

import re
from collections import OrderedDict
from typing import Any

import torch
import torchvision
from torch import Tensor, nn

from capsexp.checkpoint import read_torch_file
from capsexp.errors import UserError

STAGES = ("stem", "layer1", "layer2", "layer3", "layer4")
TORCHVISION_WEIGHTS = ("IMAGENET1K_V1", "IMAGENET1K_V2", "DEFAULT")
OUT_CHANNELS = 2048
_LAYER = re.compile(r"^layer(\d+)$")


def feature_size(image_size: int) -> int:
    """Side of the ``[B, 2048, h, h]`` feature map for a square input: five stride-2 halvings."""
    size = image_size
    for _ in range(5):
        size = (size + 1) // 2  # every stride-2 convolution/pool here rounds up
    return size


class Backbone(nn.Module):
    """ResNet50 without ``avgpool``/``fc``; returns the ``[B, 2048, H/32, W/32]`` feature map.

    Children keep torchvision's names (``conv1``, ``bn1``, ``layer1``...), so torchvision state
    dicts load directly. Stages are read from that structure: everything before the first
    ``layer<N>`` child is the stem, each ``layer<N>`` is one stage.
    """

    def __init__(self, resnet: nn.Module, freeze_depth: int = 0) -> None:
        super().__init__()
        for name, child in resnet.named_children():
            if name not in ("avgpool", "fc"):
                self.add_module(name, child)
        self.freeze_depth = freeze_depth
        self._stage_names = list(self.stages())
        for stage in list(self.stages().values())[:freeze_depth]:
            stage.requires_grad_(False)

    def stages(self) -> "OrderedDict[str, nn.Module]":
        """``stem, layer1..layer4`` as modules (the stem is a view over the leading children)."""
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
        for stage in list(self.stages().values())[: self.freeze_depth]:
            stage.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        for index, stage in enumerate(self.stages().values()):
            modules = stage.values() if isinstance(stage, nn.ModuleDict) else [stage]
            # nothing before a frozen stage is trainable, so no graph is needed through it
            with torch.set_grad_enabled(torch.is_grad_enabled() and index >= self.freeze_depth):
                for module in modules:
                    x = module(x)
        return x


def build_backbone(cfg: Any) -> Backbone:
    """Build the trunk from the ``backbone`` config group: weights, then freezing."""
    # zero-initialised last BN of each residual block: a random-init trunk starts as a shallow
    # network with well-scaled outputs (Goyal et al. 2017); loaded weights overwrite it anyway
    resnet = torchvision.models.get_model(cfg.name, weights=None, zero_init_residual=True)
    weights = cfg.weights
    if weights is not None:
        state = _torchvision_state(cfg.name, str(weights)) if str(weights) in TORCHVISION_WEIGHTS \
            else _file_state(str(weights))
        _load_trunk(resnet, state, str(weights))
    return Backbone(resnet, freeze_depth=int(cfg.freeze_depth))


def _torchvision_state(arch: str, name: str) -> dict[str, Tensor]:
    enum = torchvision.models.get_model_weights(arch)
    try:
        return enum[name].get_state_dict(progress=True, check_hash=True) if name != "DEFAULT" \
            else enum.DEFAULT.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, hash mismatch, partial download...
        hub = torch.hub.get_dir()
        raise UserError(
            f"backbone.weights: could not get torchvision's {arch} {name} weights ({type(exc).__name__}); "
            f"run once with network access so they are cached under {hub}/checkpoints, "
            f"or pass a local file with backbone.weights=/path/to/weights.pt, or use backbone.weights=null."
        ) from None


def _file_state(path: str) -> dict[str, Tensor]:
    names = ", ".join(TORCHVISION_WEIGHTS[:2])
    obj = read_torch_file(
        path, "backbone.weights",
        "no file at '{path}'; pass an existing state_dict or capsexp checkpoint, "
        f"a torchvision name ({names}), or null for random init.",
        "'{path}' is not a readable PyTorch state_dict or capsexp checkpoint ({error}).")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]  # a capsexp checkpoint
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"backbone.weights: '{path}' holds no state_dict of tensors.")
    return obj


def _load_trunk(resnet: nn.Module, state: dict[str, Tensor], source: str) -> None:
    """Load the trunk's tensors from torchvision, plain, DDP (``module.``) or capsexp (``backbone.``) keys."""
    trunk = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    cleaned: dict[str, Tensor] = {}
    for key, value in state.items():
        for prefix in ("module.", "backbone."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key in trunk:
            cleaned[key] = value
    missing = [k for k in trunk if k not in cleaned]
    wrong = [k for k, v in cleaned.items() if tuple(v.shape) != tuple(trunk[k].shape)]
    if missing or wrong:
        bad = (missing or wrong)[0]
        raise UserError(
            f"backbone.weights: '{source}' does not fit ResNet50 ({len(missing)} tensors missing, "
            f"{len(wrong)} of the wrong shape, e.g. '{bad}')."
        )
    resnet.load_state_dict(cleaned, strict=False)
