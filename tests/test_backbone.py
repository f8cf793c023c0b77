"""The ResNet trunks: feature-map shape, weights from files, freezing of exactly the named stages,
and every ``backbone`` option trained end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
from omegaconf import OmegaConf

from capsexp.rundir.checkpoint import load_checkpoint
from capsexp.config.validation import validate
from capsexp.errors import UserError
from capsexp.models.classifier import build_model
from capsexp.models.backbone import BACKBONES, STAGES, build_backbone, feature_size
from capsexp.train import train
from conftest import TINY, make_cfg, run_cli

# the published widths of the last stage: basic blocks end at 512 channels, bottlenecks at 2048
CHANNELS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048, "resnet152": 2048,
            "resnext50_32x4d": 2048, "wide_resnet50_2": 2048}
BIG = {"resnet101", "resnet152", "resnext50_32x4d", "wide_resnet50_2"}
# two steps of batch 4, one validation batch, no figures: what a trunk needs to prove it trains
RUN = ["trainer.max_steps=2", "data.train_size=8", "data.val_size=4", "data.batch_size=4",
       "trainer.limit_val_batches=1", "grads.figure_every_n_steps=0"]


def _cfg(**kw: object) -> object:
    return OmegaConf.create({"name": "resnet50", "weights": None, "freeze_depth": 0, **kw})


def _by_size(archs: "tuple[str, ...] | list[str]") -> list[object]:
    return [pytest.param(a, marks=pytest.mark.slow) if a in BIG else a for a in archs]


@pytest.mark.parametrize("size,expected", [(32, 1), (64, 2), (96, 3), (224, 7), (33, 2)])
def test_feature_map_is_2048_by_size_over_32(size: int, expected: int) -> None:
    backbone = build_backbone(_cfg()).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, size, size))
    assert out.shape == (1, 2048, expected, expected)
    assert feature_size(size) == expected


def test_every_option_has_its_group_file() -> None:
    for arch in BACKBONES:
        assert make_cfg(f"backbone={arch}").backbone.name == arch
    files = sorted(p.stem for p in (Path(__file__).parents[1] / "src/capsexp/conf/backbone").glob("*.yaml"))
    assert files == sorted(BACKBONES)


@pytest.mark.parametrize("arch", _by_size(BACKBONES))
def test_out_channels_are_what_the_architecture_outputs(arch: str) -> None:
    backbone = build_backbone(_cfg(name=arch)).eval()
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 64, 64))
    assert backbone.out_channels == CHANNELS[arch]
    assert out.shape == (1, CHANNELS[arch], feature_size(64), feature_size(64))
    assert list(backbone.stages()) == list(STAGES)


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


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_weights_from_a_torchvision_state_dict_file(tmp_path: Path, arch: str) -> None:
    source = torchvision.models.get_model(arch)
    path = tmp_path / f"{arch}.pt"
    torch.save(source.state_dict(), path)
    backbone = build_backbone(_cfg(name=arch, weights=str(path)))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, source.state_dict()[key]), key


def test_weights_of_another_architecture_name_the_chosen_one(tmp_path: Path) -> None:
    path = tmp_path / "resnet50.pt"
    torch.save(torchvision.models.resnet50().state_dict(), path)
    with pytest.raises(UserError, match=r"^backbone.weights: .* does not fit resnet18 \(") as info:
        build_backbone(_cfg(name="resnet18", weights=str(path)))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch,name,allowed", [
    ("resnet18", "IMAGENET1K_V2", "IMAGENET1K_V1 or DEFAULT (torchvision's resnet18 weights)"),
    ("resnet34", "IMAGENET1K_V2", "IMAGENET1K_V1 or DEFAULT (torchvision's resnet34 weights)"),
    ("resnet50", "IMAGENET1K_V3", "IMAGENET1K_V1, IMAGENET1K_V2 or DEFAULT (torchvision's resnet50 weights)"),
])
def test_a_weights_name_the_architecture_lacks_fails_before_any_download(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, name: str, allowed: str) -> None:
    monkeypatch.chdir(tmp_path)  # no file of that name here: it can only mean a torchvision name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "hub"))  # an empty cache: a download would be tried
    expected = f"backbone.weights='{name}' is not allowed; it must be null, {allowed}, or a file path."
    with pytest.raises(UserError) as built:
        build_backbone(_cfg(name=arch, weights=name))
    assert str(built.value) == expected
    with pytest.raises(UserError) as checked:
        validate(make_cfg(f"backbone={arch}", f"backbone.weights={name}"))
    assert str(checked.value) == expected
    assert not (tmp_path / "hub").exists()


def test_an_unknown_architecture_is_one_sentence() -> None:
    with pytest.raises(UserError, match=r"^backbone.name='vgg16' is not allowed; it must be resnet18, .* or "
                                        r"wide_resnet50_2 \(choose one with backbone=<option>\)\.$"):
        validate(make_cfg("backbone.name=vgg16"))


@pytest.mark.parametrize("content,needle", [
    (None, "no file at"),
    (b"not a checkpoint", "not a readable"),
    ({"conv1.weight": torch.zeros(3)}, "does not fit resnet50"),
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


def _trained(arch: str, run_dir: Path, *overrides: str) -> tuple[dict, dict]:
    """Train ``backbone=<arch>`` for two steps; the returned metrics and the last checkpoint."""
    metrics = train(make_cfg(f"backbone={arch}", *RUN, *overrides), run_dir=run_dir)
    return metrics, load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _trunk_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # shapes only: no memory, no initialisation cost
        reference = torchvision.models.get_model(arch)
    return {k: tuple(v.shape) for k, v in reference.state_dict().items() if not k.startswith("fc.")}


def _checkpoint_trunk(ckpt: dict) -> dict[str, tuple[int, ...]]:
    return {k.removeprefix("backbone."): tuple(v.shape) for k, v in ckpt["model"].items()
            if k.startswith("backbone.")}


@pytest.mark.parametrize("arch", _by_size(BACKBONES))
def test_every_backbone_trains_end_to_end(arch: str, tmp_path: Path, one_thread: None) -> None:
    metrics, ckpt = _trained(arch, tmp_path)
    assert metrics["steps"] == 2
    assert json.loads((tmp_path / "metrics.json").read_text())["steps"] == 2
    assert ckpt["config"]["backbone"]["name"] == arch
    assert _checkpoint_trunk(ckpt) == _trunk_shapes(arch)  # the trained trunk is torchvision's architecture
    # the head was sized by the trunk: the checkpoint loads into a fresh model, and reads its map
    model = build_model(make_cfg(f"backbone={arch}", *RUN), ckpt["num_classes"]).eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        assert model.adapter(model.backbone(torch.zeros(1, 3, 32, 32))).shape == (1, CHANNELS[arch], 1, 1)


def test_resnet18_with_capsule_head_and_conv_adapter(tmp_path: Path, one_thread: None) -> None:
    metrics, ckpt = _trained("resnet18", tmp_path, "head=capsule", "adapter=conv")
    assert metrics["steps"] == 2
    assert ckpt["config"]["head"]["name"] == "capsule" and ckpt["config"]["adapter"]["name"] == "conv"
    cfg = make_cfg("backbone=resnet18", "head=capsule", "adapter=conv", *RUN)
    model = build_model(cfg, ckpt["num_classes"]).eval()
    model.load_state_dict(ckpt["model"])
    with torch.no_grad():
        x = torch.zeros(1, 3, 32, 32)
        assert model.backbone(x).shape == (1, 512, 1, 1)
        # the adapter reads 512 channels and hands the head its own width
        assert model.adapter(model.backbone(x)).shape == (1, int(cfg.adapter.width), 1, 1)
        with pytest.raises(RuntimeError):
            model.adapter(torch.zeros(1, 2048, 1, 1))


@pytest.mark.slow
def test_a_sweep_over_backbones_runs_one_job_each(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    tiny = [a for a in TINY if not a.startswith("backbone=")]  # the sweep names the backbone
    proc = run_cli("train", "-m", "backbone=resnet18,resnet50", *tiny, *RUN, f"hydra.sweep.dir={sweep}",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert jobs == ["00_backbone=resnet18", "01_backbone=resnet50"]
    for job, arch in zip(jobs, ("resnet18", "resnet50")):
        assert json.loads((sweep / job / "metrics.json").read_text())["steps"] == 2
        trained = load_checkpoint(sweep / job / "checkpoints" / "last.pt")
        assert _checkpoint_trunk(trained) == _trunk_shapes(arch)
