"""The capsule head: shapes, weight layout, gradients, hooks and mixed precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from capsexp.capsules import dynamic_routing, squash
from capsexp.models.capsule_head import INACTIVE_LENGTH, CapsuleHead, reconstruction_target

SRC = Path(__file__).resolve().parents[1] / "src"
HEAD_YAML = SRC / "capsexp" / "conf" / "head" / "capsule.yaml"
SMALL = dict(primary_types=4, primary_dim=4, class_dim=6)


def _features(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(batch, channels, size, size, generator=generator))


@pytest.mark.parametrize(
    ("size", "options", "inputs"),
    [
        (1, {}, 4),
        (2, {}, 2 * 2 * 4),
        (7, {}, 7 * 7 * 4),
        (1, {"kernel_size": 3}, 4),  # kernel clipped to the 1x1 map
        (7, {"kernel_size": 3, "stride": 2}, 3 * 3 * 4),
        (7, {"pooled": True}, 4),
        (7, {"share_weights": True}, 7 * 7 * 4),
        (2, {"pooled": True, "share_weights": True}, 4),
    ],
)
def test_output_shape_and_weight_shape(size: int, options: dict, inputs: int) -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (size, size), 5, **SMALL, **options)
    scores = head(_features(3, 8, size))
    assert scores.shape == (3, 5)
    assert ((scores >= 0) & (scores < 1)).all()
    assert head.primary.num_capsules == inputs
    rows = 4 if options.get("share_weights") else inputs
    assert head.class_caps.weight.shape == (rows, 5, 6, 4)


class _Allocations(TorchDispatchMode):
    """Records the storage size (bytes) behind every tensor an operator returns.

    Storage, not ``numel``: an ``expand``-ed view costs nothing, a materialised copy does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.nbytes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        self.nbytes += [t.untyped_storage().nbytes() for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


def _allocations(batch: int, **options: object) -> tuple[_Allocations, CapsuleHead]:
    torch.manual_seed(0)
    head = CapsuleHead(64, (7, 7), 10, primary_types=8, primary_dim=8, class_dim=16, **options)
    features = _features(batch, 64, 7)
    with _Allocations() as record:
        head(features).sum().backward()
    return record, head


@pytest.mark.parametrize("options", [{}, {"routing_detach": True}, {"routing_iterations": 1},
                                     {"share_weights": True}])
def test_memory_is_linear_in_batch_without_a_per_sample_weight_copy(options: dict) -> None:
    inputs, classes, class_dim, batch = 7 * 7 * 8, 10, 16, 8
    record, head = _allocations(batch, **options)
    assert head.primary.num_capsules == inputs
    weight_bytes = head.class_caps.weight.numel() * 4
    predictions_bytes = batch * inputs * classes * class_dim * 4
    # nothing in forward + backward is larger than the weight (its gradient) or the predictions
    # u_hat [B, I, J, 16]; a W_ij copied per sample would be batch x the weight
    assert max(record.nbytes) <= max(weight_bytes, predictions_bytes)
    # all memory that forward + backward allocate is a + b * batch: equal steps in batch, equal growth
    totals = [sum(_allocations(b, **options)[0].nbytes) for b in (2, 4, 6)]
    assert totals[2] - totals[1] == totals[1] - totals[0] > 0


def test_scores_match_a_manual_forward() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(3, (2, 2), 4, primary_types=2, primary_dim=3, class_dim=5)
    x = _features(2, 3, 2)
    conv = head.primary.conv(x)  # [B, types*dim, 2, 2]; channel = type*dim + d
    w = head.class_caps.weight
    u_hat = torch.zeros(2, 8, 4, 5)
    for b in range(2):
        for p in range(4):
            row, col = divmod(p, 2)
            for t in range(2):
                u_i = squash(conv[b, t * 3 : (t + 1) * 3, row, col])
                for j in range(4):
                    u_hat[b, p * 2 + t, j] = w[p * 2 + t, j] @ u_i
    v = dynamic_routing(u_hat, 3)
    expected = torch.sqrt((v**2).sum(-1) + 1e-8)
    torch.testing.assert_close(head(x), expected, rtol=1e-5, atol=1e-6)


def test_shared_weights_equal_unshared_weights_repeated_over_positions() -> None:
    torch.manual_seed(0)
    shared = CapsuleHead(6, (3, 3), 4, **SMALL, share_weights=True)
    unshared = CapsuleHead(6, (3, 3), 4, **SMALL)
    with torch.no_grad():
        unshared.primary.load_state_dict(shared.primary.state_dict())
        # Capsule i = position * types + type uses the type's matrix.
        unshared.class_caps.weight.copy_(shared.class_caps.weight.repeat(9, 1, 1, 1))
    x = _features(2, 6, 3)
    torch.testing.assert_close(shared(x), unshared(x))


def test_pooled_primary_capsules_average_over_positions() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(5, (4, 4), 3, **SMALL, pooled=True)
    x = _features(2, 5, 4)
    expected = squash(head.primary.conv(x).mean(dim=(2, 3)).view(2, 4, 4))
    torch.testing.assert_close(head.primary(x), expected)


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_every_parameter(detach: bool) -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (2, 2), 5, **SMALL, routing_detach=detach, reconstruction=True,
                       decoder_hidden=(16, 32), decoder_image_size=8)
    images = torch.randn(3, 3, 32, 32)
    targets = torch.tensor([0, 3, 4])
    scores = head(_features(3, 8, 2))
    aux = head.auxiliary_loss(images, targets)
    (scores.sum() + aux).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_telemetry_keys_and_values() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (2, 2), 5, **SMALL, routing_iterations=3)
    targets = torch.tensor([1, 2])
    scores = head(_features(2, 8, 2))
    stats = head.telemetry(targets)
    expected_keys = {f"capsule/coupling_entropy/iter{k}" for k in (1, 2, 3)} | {
        "capsule/true_class_length",
        "capsule/other_class_length",
        "capsule/inactive_input_fraction",
    }
    assert set(stats) == expected_keys
    for key, value in stats.items():
        assert value.dim() == 0 and torch.isfinite(value) and not value.requires_grad, key
    # The first iteration is uniform coupling over 5 classes: entropy log 5.
    torch.testing.assert_close(stats["capsule/coupling_entropy/iter1"], torch.tensor(5.0).log())
    torch.testing.assert_close(stats["capsule/true_class_length"], scores[[0, 1], [1, 2]].mean())
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[[0, 1], [1, 2]] = False
    torch.testing.assert_close(stats["capsule/other_class_length"], scores[mask].mean())
    primary_lengths = head.primary(_features(2, 8, 2)).norm(dim=-1)
    inactive = (primary_lengths < INACTIVE_LENGTH).float().mean()
    torch.testing.assert_close(stats["capsule/inactive_input_fraction"], inactive)


def test_reconstruction_loss_and_grid() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (1, 1), 4, **SMALL, reconstruction=True,
                       decoder_hidden=(16,), decoder_image_size=8)
    images = torch.randn(10, 3, 32, 32)
    targets = torch.arange(10) % 4
    head(_features(10, 8, 1))
    grid_before_loss = head.images(images, targets)["capsule/reconstruction"]
    loss = head.auxiliary_loss(images, targets)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    grid = head.images(images, targets)["capsule/reconstruction"]
    # 8 inputs above 8 reconstructions, 8x8 images with 2 px padding.
    assert grid.shape == (3, 2 + 2 * 10, 2 + 8 * 10)
    assert grid.min() >= 0 and grid.max() <= 1
    torch.testing.assert_close(grid, grid_before_loss)


def _decoder_inputs(head: CapsuleHead) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    head.decoder[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    return seen


@pytest.mark.parametrize("training", [True, False])
def test_reconstruction_loss_formula_and_mask(training: bool) -> None:
    """Sum of squared errors per image, batch mean; one class capsule decoded, the rest zero.

    Training keeps the true class's capsule; evaluation keeps the longest (the prediction).
    """
    torch.manual_seed(0)
    classes, size = 4, 6
    head = CapsuleHead(8, (1, 1), classes, **SMALL, reconstruction=True,
                       decoder_hidden=(16,), decoder_image_size=size)
    head.train(training)
    images = torch.rand(5, 3, 12, 12)
    targets = torch.tensor([0, 1, 2, 3, 1])
    scores = head(_features(5, 8, 1))
    seen = _decoder_inputs(head)
    loss = head.auxiliary_loss(images, targets)

    v = head._latest()["v"].detach()
    keep = targets if training else scores.argmax(dim=1)
    masked = torch.zeros_like(v)
    masked[torch.arange(5), keep] = v[torch.arange(5), keep]
    torch.testing.assert_close(seen[0], masked.flatten(1))
    recon = head.decoder(masked.flatten(1)).view(5, 3, size, size)
    expected = ((recon - reconstruction_target(images, size)) ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected)
    # in evaluation the labels do not reach the decoder at all
    other = head.auxiliary_loss(images, (targets + 1) % classes)
    assert len(seen) == 3  # the loss, the hand-made decode above, the loss with other labels
    if training:
        assert not torch.equal(seen[2], seen[0])
    else:
        torch.testing.assert_close(seen[2], seen[0])
        torch.testing.assert_close(other, loss)


def test_reconstruction_target_is_min_max_of_the_area_downsample() -> None:
    images = torch.randn(2, 3, 4, 4)
    target = reconstruction_target(images, 2)
    pooled = torch.nn.functional.avg_pool2d(images, 2)
    for b in range(2):
        expected = (pooled[b] - pooled[b].min()) / (pooled[b].max() - pooled[b].min())
        torch.testing.assert_close(target[b], expected)


def test_no_reconstruction_hooks_are_empty() -> None:
    head = CapsuleHead(8, (1, 1), 3, **SMALL)
    head(_features(2, 8, 1))
    assert head.decoder is None
    assert head.auxiliary_loss(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) is None
    assert head.images(torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) == {}


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (2, 2), 5, **SMALL, reconstruction=True,
                       decoder_hidden=(16,), decoder_image_size=8)
    images = torch.randn(2, 3, 16, 16)
    targets = torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(_features(2, 8, 2))
        aux = head.auxiliary_loss(images, targets)
        stats = head.telemetry(targets)
    assert torch.isfinite(scores).all() and torch.isfinite(aux)
    assert all(torch.isfinite(v) for v in stats.values())
    (scores.float().sum() + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_from_config_reads_the_shipped_yaml() -> None:
    cfg = OmegaConf.load(HEAD_YAML).head  # a global-package file: the group sits under `head:`
    head = CapsuleHead.from_config(cfg, in_channels=16, feature_size=(2, 2), num_classes=3,
                                   reconstruction=True)
    assert head.class_caps.weight.shape == (2 * 2 * 32, 3, 16, 8)
    assert head.routing_iterations == 3 and head.decoder is not None
    assert head(_features(1, 16, 2)).shape == (1, 3)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"primary_types": 0}, "head.primary.types"),
        ({"primary_dim": 0}, "head.primary.dim"),
        ({"kernel_size": 0}, "head.primary.kernel_size"),
        ({"stride": 0}, "head.primary.stride"),
        ({"class_dim": 0}, "head.class_dim"),
        ({"routing_iterations": 0}, "head.routing.iterations"),
        ({"init_std": 0.0}, "head.init_std"),
        ({"reconstruction": True, "decoder_image_size": 0}, "head.decoder.image_size"),
    ],
)
def test_impossible_settings_raise(options: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        CapsuleHead(8, (1, 1), 3, **options)


def test_wrong_feature_size_raises() -> None:
    head = CapsuleHead(8, (2, 2), 3, **SMALL)
    with pytest.raises(ValueError, match="2x2"):
        head(_features(1, 8, 3))


def test_hooks_before_forward_raise() -> None:
    head = CapsuleHead(8, (1, 1), 3, **SMALL)
    with pytest.raises(RuntimeError, match="forward"):
        head.telemetry(torch.tensor([0]))
