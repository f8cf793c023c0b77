"""Every adapter x head x loss trains: finite losses and a gradient on every trainable parameter."""

from __future__ import annotations

import itertools

import pytest
import torch

from capsexp.models.classifier import build_model, score_kind
from capsexp.models.heads import Measure
from capsexp.models.losses import build_loss
from capsexp.models.objective import Objective
from conftest import make_cfg

COMBOS = list(itertools.product(["none", "conv", "linear"], ["fc", "capsule"], ["ce", "margin", "spread"]))


def _objective(*overrides: str, num_classes: int = 5) -> Objective:
    cfg = make_cfg(*overrides)
    model = build_model(cfg, num_classes)
    return Objective(model, build_loss(cfg.loss, score_kind(cfg.head)))


@pytest.mark.parametrize("adapter,head,loss", COMBOS)
def test_a_few_steps_give_finite_losses_and_gradients_everywhere(adapter: str, head: str, loss: str) -> None:
    torch.manual_seed(0)
    objective = _objective(f"adapter={adapter}", f"head={head}", f"loss={loss}", "data.image_size=32")
    objective.train()
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.01, momentum=0.9)
    images, targets = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    reached: set[str] = set()  # parameters that received a non-zero gradient at some step
    for step in range(2):
        optimizer.zero_grad()
        value, scores, *_ = objective(images, targets, step / 2)
        assert scores.shape == (4, 5)
        assert torch.isfinite(value)
        value.backward()
        missing = [n for n, p in objective.named_parameters()
                   if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
        assert not missing, missing[:5]
        reached |= {n for n, p in objective.named_parameters() if p.grad is not None and p.grad.any()}
        optimizer.step()
    # zero-initialised residual branches get their first gradient at the second step
    assert any(n.startswith("model.backbone.layer1.") for n in reached)
    unreached = [n for n, p in objective.named_parameters() if p.requires_grad and n not in reached]
    assert not unreached, unreached[:5]


def test_capsule_reconstruction_trains_the_decoder_and_weights_the_loss() -> None:
    torch.manual_seed(0)
    images, targets = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    plain = _objective("head=capsule", "adapter=conv")
    with_rec = _objective("head=capsule", "adapter=conv", "head.decoder.weight=0.0005")
    assert plain.model.head.decoder is None and with_rec.model.head.auxiliary_weight == 0.0005
    with_rec.load_state_dict(plain.state_dict(), strict=False)  # same trunk and capsules
    plain.eval(), with_rec.eval()
    base, *_ = plain(images, targets, 0.0)
    total, _, telemetry, shown, _ = with_rec(images, targets, 0.0)
    assert telemetry == {} and shown == {}  # nothing measured unless asked
    head = with_rec.model.head
    aux, _ = head.auxiliary_loss(with_rec.model(images), images, targets)
    assert torch.allclose(total, base + 0.0005 * aux, rtol=1e-5)
    total.backward()
    assert all(p.grad is not None for p in head.decoder.parameters())
    drawn, _, telemetry, grid, _ = with_rec(images, targets, 0.0, Measure(telemetry=True, images=True))
    torch.testing.assert_close(drawn, total)
    assert set(grid) == {"capsule/reconstruction"}
    assert all(g.ndim == 3 and g.shape[0] == 3 for g in grid.values())
    assert "capsule/coupling_entropy/iter1" in telemetry


def test_224px_batch2_capsule_without_adapter_fits_on_cpu() -> None:
    """The naive connection (2048 channels straight into capsules) at full size, forward and backward."""
    torch.manual_seed(0)
    objective = _objective("head=capsule", "adapter=none", "backbone=resnet50", "data.image_size=224",
                           num_classes=10)
    assert objective.model.backbone.out_channels == 2048
    head = objective.model.head
    value, scores, *_ = objective(torch.randn(2, 3, 224, 224), torch.tensor([1, 2]), 0.0)
    value.backward()
    assert scores.shape == (2, 10) and torch.isfinite(value)
    # one W_ij per input capsule of the 7x7 map (the no-copy check: test_capsule_head.py)
    weights = [p for n, p in head.named_parameters() if n.startswith("routing.class_caps")]
    assert weights[0].shape[0] == 32 * 7 * 7 and weights[0].ndim == 4


def test_the_pool_adapter_cuts_the_input_capsules_to_its_map() -> None:
    torch.manual_seed(0)
    objective = _objective("head=capsule", "adapter=pool", "adapter.size=2", "data.image_size=128")
    head = objective.model.head
    assert head.routing.primary.num_capsules == 2 * 2 * 32  # a 4x4 map pooled to 2x2, 32 capsule types
    features = torch.randn(2, objective.model.backbone.out_channels, 4, 4)
    pooled = objective.model.adapter(features)
    torch.testing.assert_close(pooled[:, :, 0, 0], features[:, :, :2, :2].mean(dim=(2, 3)))
    value, scores, *_ = objective(torch.randn(2, 3, 128, 128), torch.tensor([0, 1]), 0.0)
    assert scores.shape == (2, 5) and torch.isfinite(value)
