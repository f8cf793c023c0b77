"""The ResNet50 trunk: feature-map shape, weights from files, freezing of exactly the named stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from capsexp.errors import UserError
from capsexp.models.backbone import STAGES, build_backbone, feature_size


def _cfg(**kw: object) -> object:
    return OmegaConf.create({"name": "resnet50", "weights": None, "freeze_depth": 0, **kw})


@pytest.mark.parametrize("size,expected", [(32, 1), (64, 2), (96, 3), (224, 7), (33, 2)])
def test_feature_map_is_2048_by_size_over_32(size: int, expected: int) -> None:
    backbone = build_backbone(_cfg()).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, size, size))
    assert out.shape == (1, 2048, expected, expected)
    assert feature_size(size) == expected


def test_stages_are_found_from_structure() -> None:
    stages = build_backbone(_cfg()).stages()
    assert list(stages) == list(STAGES)
    assert set(stages["stem"].keys()) == {"conv1", "bn1", "relu", "maxpool"}


@pytest.mark.parametrize("depth", range(6))
def test_freeze_depth_freezes_exactly_the_leading_stages(depth: int) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(_cfg(freeze_depth=depth))
    backbone.train()
    stages = backbone.stages()
    before = {name: {k: v.clone() for k, v in m.state_dict().items() if "running" in k}
              for name, m in stages.items()}
    out = backbone(torch.randn(4, 3, 64, 64))
    if depth < 5:
        out.square().mean().backward()
    for index, (name, module) in enumerate(stages.items()):
        frozen = index < depth
        params = list(module.parameters())
        assert all(p.requires_grad != frozen for p in params), name
        assert all((p.grad is None) == frozen for p in params), name
        bns = [m for m in module.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        assert all(bn.training != frozen for bn in bns), name
        after = {k: v for k, v in module.state_dict().items() if "running" in k}
        unchanged = all(torch.equal(before[name][k], after[k]) for k in after)
        assert unchanged == frozen, name  # frozen BN statistics stay; trained ones move


def test_weights_from_a_torchvision_state_dict_file(tmp_path: Path) -> None:
    source = torchvision.models.resnet50()
    path = tmp_path / "resnet50.pt"
    torch.save(source.state_dict(), path)
    backbone = build_backbone(_cfg(weights=str(path)))
    assert torch.equal(backbone.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


@pytest.mark.parametrize("content,needle", [
    (None, "no file at"),
    (b"not a checkpoint", "not a readable"),
    ({"conv1.weight": torch.zeros(3)}, "does not fit ResNet50"),
])
def test_unusable_weights_are_one_clear_sentence(tmp_path: Path, content: object, needle: str) -> None:
    path = tmp_path / "w.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        torch.save(content, path)
    with pytest.raises(UserError, match=needle) as info:
        build_backbone(_cfg(weights=str(path)))
    assert str(info.value).startswith("backbone.weights")
    assert "\n" not in str(info.value)
