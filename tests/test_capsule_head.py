"""The capsule head: shapes, weight layout, gradients, hooks and mixed precision."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.transforms import v2

from capsexp.models.capsules import dynamic_routing, squash
from capsexp.data.datasets import IMAGENET_MEAN, IMAGENET_STD
from capsexp.models.capsule_head import INACTIVE_LENGTH, reconstruction_target
from capsexp.models.capsule_head import CapsuleHead as _CapsuleHead

SRC = Path(__file__).resolve().parents[1] / "src"
HEAD_YAML = SRC / "capsexp" / "conf" / "head" / "capsule.yaml"
SMALL = dict(primary_types=4, primary_dim=4, class_dim=6)


def _defaults() -> dict:
    """The constructor's keyword arguments as the shipped YAML sets them (defaults live there only)."""
    cfg = OmegaConf.load(HEAD_YAML).head  # a global-package file: the group sits under `head:`
    primary, routing, decoder = cfg.primary, cfg.routing, cfg.decoder
    return dict(primary_types=primary.types, primary_dim=primary.dim, kernel_size=primary.kernel_size,
                stride=primary.stride, pooled=primary.pooled, class_dim=cfg.class_dim, init_std=cfg.init_std,
                share_weights=cfg.share_weights, routing_iterations=routing.iterations,
                routing_detach=routing.detach, reconstruction=False, decoder_hidden=tuple(decoder.hidden),
                decoder_image_size=decoder.image_size)


def CapsuleHead(in_channels: int, size: tuple[int, int], classes: int, **options: object) -> _CapsuleHead:
    return _CapsuleHead(in_channels, size, classes, **{**_defaults(), **options})


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
    scores = head(_features(3, 8, size)).scores
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


def _allocations(batch: int, **options: object) -> tuple[_Allocations, _CapsuleHead]:
    torch.manual_seed(0)
    head = CapsuleHead(64, (7, 7), 10, primary_types=8, primary_dim=8, class_dim=16, **options)
    features = _features(batch, 64, 7)
    with _Allocations() as record:
        head(features).scores.sum().backward()
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
    torch.testing.assert_close(head(x).scores, expected, rtol=1e-5, atol=1e-6)


def test_shared_weights_equal_unshared_weights_repeated_over_positions() -> None:
    torch.manual_seed(0)
    shared = CapsuleHead(6, (3, 3), 4, **SMALL, share_weights=True)
    unshared = CapsuleHead(6, (3, 3), 4, **SMALL)
    with torch.no_grad():
        unshared.primary.load_state_dict(shared.primary.state_dict())
        # Capsule i = position * types + type uses the type's matrix.
        unshared.class_caps.weight.copy_(shared.class_caps.weight.repeat(9, 1, 1, 1))
    x = _features(2, 6, 3)
    torch.testing.assert_close(shared(x).scores, unshared(x).scores)


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
    out = head(_features(3, 8, 2))
    aux, _ = head.auxiliary_loss(out, images, targets)
    (out.scores.sum() + aux).backward()
    for name, param in head.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, name


def test_telemetry_keys_and_values() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (2, 2), 5, **SMALL, routing_iterations=3)
    targets = torch.tensor([1, 2])
    out = head(_features(2, 8, 2))
    scores = out.scores
    stats = head.telemetry(out, targets)
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
    out = head(_features(10, 8, 1))
    loss, visuals = head.auxiliary_loss(out, images, targets)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    grid = head.images(visuals)["capsule/reconstruction"]
    # 8 inputs above 8 reconstructions, 8x8 images with 2 px padding.
    assert grid.shape == (3, 2 + 2 * 10, 2 + 8 * 10)
    assert grid.min() >= 0 and grid.max() <= 1
    # the top row is the targets, the bottom row the reconstructions the loss compared them with
    torch.testing.assert_close(grid[:, 2:10, 2:10], reconstruction_target(images[:1], 8)[0])
    torch.testing.assert_close(grid[:, 12:20, 2:10], visuals["reconstruction"][0].clamp(0, 1))
    # the same values give the same grid, in any order and as often as asked
    torch.testing.assert_close(head.images(visuals)["capsule/reconstruction"], grid)


def _decoder_inputs(head: _CapsuleHead) -> list[torch.Tensor]:
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
    out = head(_features(5, 8, 1))
    scores = out.scores
    seen = _decoder_inputs(head)
    loss, _ = head.auxiliary_loss(out, images, targets)

    v = out.extras["v"].detach()
    keep = targets if training else scores.argmax(dim=1)
    masked = torch.zeros_like(v)
    masked[torch.arange(5), keep] = v[torch.arange(5), keep]
    torch.testing.assert_close(seen[0], masked.flatten(1))
    recon = head.decoder(masked.flatten(1)).view(5, 3, size, size)
    expected = ((recon - reconstruction_target(images, size)) ** 2).sum(dim=(1, 2, 3)).mean()
    torch.testing.assert_close(loss, expected)
    # in evaluation the labels do not reach the decoder at all
    other, _ = head.auxiliary_loss(out, images, (targets + 1) % classes)
    assert len(seen) == 3  # the loss, the hand-made decode above, the loss with other labels
    if training:
        assert not torch.equal(seen[2], seen[0])
    else:
        torch.testing.assert_close(seen[2], seen[0])
        torch.testing.assert_close(other, loss)


def test_reconstruction_target_undoes_the_pipeline_normalisation() -> None:
    # a known [0, 1] image through the data pipeline's own normalisation comes back unchanged
    image = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    image[0, 0] = 0.0  # a channel that min-max per image could not recover
    image[1, 2] = 1.0
    normalise = v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)
    normalised = torch.stack([normalise(x) for x in image])
    torch.testing.assert_close(reconstruction_target(normalised, 8), image, rtol=0, atol=1e-6)
    # smaller: the area average of the original; out-of-range values are clamped first
    pooled = torch.nn.functional.avg_pool2d(image, 2)
    torch.testing.assert_close(reconstruction_target(normalised, 4), pooled, rtol=0, atol=1e-6)
    outside = normalise(torch.full((3, 4, 4), 2.0)).unsqueeze(0)
    assert torch.equal(reconstruction_target(outside, 2), torch.ones(1, 3, 2, 2))


def test_no_reconstruction_hooks_are_empty() -> None:
    head = CapsuleHead(8, (1, 1), 3, **SMALL)
    out = head(_features(2, 8, 1))
    assert head.decoder is None
    assert head.auxiliary_loss(out, torch.randn(2, 3, 8, 8), torch.tensor([0, 1])) is None
    assert head.images({}) == {}


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    head = CapsuleHead(8, (2, 2), 5, **SMALL, reconstruction=True,
                       decoder_hidden=(16,), decoder_image_size=8)
    images = torch.randn(2, 3, 16, 16)
    targets = torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(_features(2, 8, 2))
        scores = out.scores
        aux, _ = head.auxiliary_loss(out, images, targets)
        stats = head.telemetry(out, targets)
    assert torch.isfinite(scores).all() and torch.isfinite(aux)
    assert all(torch.isfinite(v) for v in stats.values())
    (scores.float().sum() + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_from_config_reads_the_shipped_yaml() -> None:
    cfg = OmegaConf.load(HEAD_YAML).head  # a global-package file: the group sits under `head:`
    head = _CapsuleHead.from_config(cfg, in_channels=16, feature_size=(2, 2), num_classes=3,
                                   reconstruction=True)
    assert head.class_caps.weight.shape == (2 * 2 * 32, 3, 16, 8)
    assert head.routing_iterations == 3 and head.decoder is not None
    assert head(_features(1, 16, 2)).scores.shape == (1, 3)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("head.primary.types=0", "head.primary.types"),
        ("head.primary.dim=0", "head.primary.dim"),
        ("head.primary.kernel_size=0", "head.primary.kernel_size"),
        ("head.primary.stride=0", "head.primary.stride"),
        ("head.class_dim=0", "head.class_dim"),
        ("head.routing.iterations=0", "head.routing.iterations"),
        ("head.init_std=0.0", "head.init_std"),
        ("head.decoder.image_size=0", "head.decoder.image_size"),
        ("head.decoder.hidden=[16,0]", "head.decoder.hidden"),
    ],
)
def test_impossible_settings_are_refused_by_the_config_check(override: str, key: str) -> None:
    from conftest import make_cfg

    from capsexp.config.validation import validate
    from capsexp.errors import UserError

    with pytest.raises(UserError, match=rf"^{key.replace('.', r'[.]')}=.* is not allowed; it must be "):
        validate(make_cfg("head=capsule", override))


def test_wrong_feature_size_raises() -> None:
    head = CapsuleHead(8, (2, 2), 3, **SMALL)
    with pytest.raises(ValueError, match="2x2"):
        head(_features(1, 8, 3))


def test_optional_methods_read_only_the_values_they_are_given() -> None:
    # no state from the latest forward: telemetry of an earlier output stays that output's
    torch.manual_seed(0)
    head = CapsuleHead(8, (2, 2), 3, **SMALL)
    targets = torch.tensor([0, 2])
    first, second = head(_features(2, 8, 2, seed=1)), head(_features(2, 8, 2, seed=2))
    late = head.telemetry(first, targets)["capsule/true_class_length"]
    torch.testing.assert_close(late, first.scores[[0, 1], [0, 2]].mean())
    assert not torch.equal(late, head.telemetry(second, targets)["capsule/true_class_length"])
