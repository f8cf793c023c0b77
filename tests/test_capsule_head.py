"""The capsule head: shapes, weight layout, gradients, hooks, routings and mixed precision."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.transforms import v2

from capsexp.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from capsexp.models.capsule_head import INACTIVE_LENGTH, CapsuleHead, reconstruction_target
from capsexp.models.capsule_layers import PrimaryCapsules
from capsexp.models.capsules import squash
from capsexp.models.heads import Measure
from capsexp.models.routing import ROUTINGS
from capsexp.models.routing_algorithms import dynamic_routing

SRC = Path(__file__).resolve().parents[1] / "src"
HEAD_YAML = SRC / "capsexp" / "conf" / "head" / "capsule.yaml"
SMALL: dict[str, Any] = {"primary": {"types": 4, "dim": 4}, "class_dim": 6}
TELEMETRY = Measure(telemetry=True)


def _head_cfg(*partial: dict[str, Any], **overrides: Any) -> DictConfig:
    """The shipped ``head`` node (defaults live in the YAML only), with nested overrides merged in:
    ``_head_cfg(SMALL, routing={"iterations": 1})``."""
    cfg = OmegaConf.load(HEAD_YAML).head  # a global-package file: the group sits under `head:`
    return OmegaConf.merge(cfg, *partial, overrides)


def _head(in_channels: int, size: tuple[int, int], classes: int, *partial: dict[str, Any],
          **overrides: Any) -> CapsuleHead:
    return CapsuleHead(_head_cfg(*partial, **overrides), in_channels, size, classes)


def _decoder(hidden: list[int], image_size: int, weight: float = 0.0005) -> dict[str, Any]:
    return {"decoder": {"weight": weight, "hidden": hidden, "image_size": image_size}}


def _features(batch: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.relu(torch.randn(batch, channels, size, size, generator=generator))


@pytest.mark.parametrize(
    ("size", "options", "inputs"),
    [
        (1, {}, 4),
        (2, {}, 2 * 2 * 4),
        (7, {}, 7 * 7 * 4),
        (1, {"primary": {"kernel_size": 3}}, 4),  # kernel clipped to the 1x1 map
        (7, {"primary": {"kernel_size": 3, "stride": 2}}, 3 * 3 * 4),
        (7, {"primary": {"pooled": True}}, 4),
        (7, {"share_weights": True}, 7 * 7 * 4),
        (2, {"primary": {"pooled": True}, "share_weights": True}, 4),
    ],
)
def test_output_shape_and_weight_shape(size: int, options: dict, inputs: int) -> None:
    torch.manual_seed(0)
    head = _head(8, (size, size), 5, SMALL, options)
    scores = head(_features(3, 8, size)).scores
    assert scores.shape == (3, 5)
    assert ((scores >= 0) & (scores < 1)).all()
    assert head.routing.primary.num_capsules == inputs
    assert head.input_capsules == inputs
    rows = 4 if options.get("share_weights") else inputs
    assert head.routing.class_caps.weight.shape == (rows, 5, 6, 4)


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


def _allocations(batch: int, options: dict) -> tuple[_Allocations, CapsuleHead]:
    torch.manual_seed(0)
    head = _head(64, (7, 7), 10, {"primary": {"types": 8, "dim": 8}, "class_dim": 16}, options)
    features = _features(batch, 64, 7)
    with _Allocations() as record:
        head(features).scores.sum().backward()
    return record, head


@pytest.mark.parametrize("options", [{}, {"routing": {"detach": True}}, {"routing": {"iterations": 1}},
                                     {"share_weights": True}])
def test_memory_is_linear_in_batch_without_a_per_sample_weight_copy(options: dict) -> None:
    inputs, classes, class_dim, batch = 7 * 7 * 8, 10, 16, 8
    record, head = _allocations(batch, options)
    assert head.routing.primary.num_capsules == inputs
    weight_bytes = head.routing.class_caps.weight.numel() * 4
    predictions_bytes = batch * inputs * classes * class_dim * 4
    # nothing in forward + backward is larger than the weight (its gradient) or the predictions
    # u_hat [B, I, J, 16]; a W_ij copied per sample would be batch x the weight
    assert max(record.nbytes) <= max(weight_bytes, predictions_bytes)
    # all memory that forward + backward allocate is a + b * batch: equal steps in batch, equal growth
    totals = [sum(_allocations(b, options)[0].nbytes) for b in (2, 4, 6)]
    assert totals[2] - totals[1] == totals[1] - totals[0] > 0


def test_scores_match_a_manual_forward() -> None:
    torch.manual_seed(0)
    head = _head(3, (2, 2), 4, {"primary": {"types": 2, "dim": 3}, "class_dim": 5})
    x = _features(2, 3, 2)
    conv = head.routing.primary.conv(x)  # [B, types*dim, 2, 2]; channel = type*dim + d
    w = head.routing.class_caps.weight
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
    shared = _head(6, (3, 3), 4, SMALL, share_weights=True)
    unshared = _head(6, (3, 3), 4, SMALL)
    with torch.no_grad():
        unshared.routing.primary.load_state_dict(shared.routing.primary.state_dict())
        # Capsule i = position * types + type uses the type's matrix.
        unshared.routing.class_caps.weight.copy_(shared.routing.class_caps.weight.repeat(9, 1, 1, 1))
    x = _features(2, 6, 3)
    torch.testing.assert_close(shared(x).scores, unshared(x).scores)


def test_pooled_primary_capsules_average_over_positions() -> None:
    torch.manual_seed(0)
    head = _head(5, (4, 4), 3, SMALL, primary={"pooled": True})
    x = _features(2, 5, 4)
    pooled = head.routing.primary.conv(x).mean(dim=(2, 3)).view(2, 4, 4)
    # the primary layer returns the raw capsules; the dynamic routing squashes them
    torch.testing.assert_close(head.routing.primary(x), pooled)
    v = dynamic_routing(head.routing.class_caps(squash(pooled)), 3)
    torch.testing.assert_close(head(x).scores, torch.sqrt((v**2).sum(-1) + 1e-8))


@pytest.mark.parametrize("detach", [False, True])
def test_gradient_reaches_every_parameter(detach: bool) -> None:
    torch.manual_seed(0)
    head = _head(8, (2, 2), 5, SMALL, _decoder([16, 32], 8), routing={"detach": detach})
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
    head = _head(8, (2, 2), 5, SMALL, routing={"iterations": 3})
    targets = torch.tensor([1, 2])
    out = head(_features(2, 8, 2), TELEMETRY)
    scores = out.scores
    stats = head.telemetry(out, targets)
    expected_keys = {f"capsule/coupling_entropy/iter{k}" for k in (1, 2, 3)} | {
        "capsule/true_class_length",
        "capsule/other_class_length",
        "capsule/inactive_input_fraction",
        "routing/entropy_deficit", "routing/max_coupling", "routing/change", "routing/gain",
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
    primary = squash(head.routing.primary(_features(2, 8, 2)))
    primary_lengths = torch.sqrt(primary.pow(2).sum(-1) + 1e-8)
    torch.testing.assert_close(out.extras["presence"], primary_lengths)
    inactive = (primary_lengths < INACTIVE_LENGTH).float().mean()
    torch.testing.assert_close(stats["capsule/inactive_input_fraction"], inactive)


def test_reconstruction_loss_and_grid() -> None:
    torch.manual_seed(0)
    head = _head(8, (1, 1), 4, SMALL, _decoder([16], 8))
    images = torch.randn(10, 3, 32, 32)
    targets = torch.arange(10) % 4
    out = head(_features(10, 8, 1))
    loss, grids = head.auxiliary_loss(out, images, targets, draw=True)
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    assert set(grids) == {"capsule/reconstruction"}
    grid = grids["capsule/reconstruction"]
    # 8 inputs above 8 reconstructions, 8x8 images with 2 px padding.
    assert grid.shape == (3, 2 + 2 * 10, 2 + 8 * 10)
    assert grid.min() >= 0 and grid.max() <= 1
    # the top row is the targets, the bottom row the reconstructions the loss compared them with
    torch.testing.assert_close(grid[:, 2:10, 2:10], reconstruction_target(images[:1], 8)[0])
    v = out.extras["v"].detach()
    masked = torch.zeros_like(v)
    masked[torch.arange(10), targets] = v[torch.arange(10), targets]  # training: the true class
    with torch.no_grad():
        recon = head.decoder(masked.flatten(1)).view(10, 3, 8, 8)
    torch.testing.assert_close(grid[:, 12:20, 2:10], recon[0].clamp(0, 1))
    # the same values give the same loss and grid, as often as asked; without draw, no grid
    again, grids_again = head.auxiliary_loss(out, images, targets, draw=True)
    torch.testing.assert_close(grids_again["capsule/reconstruction"], grid)
    plain, no_grids = head.auxiliary_loss(out, images, targets)
    assert no_grids == {}
    torch.testing.assert_close(again, loss)
    torch.testing.assert_close(plain, loss)


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
    head = _head(8, (1, 1), classes, SMALL, _decoder([16], size))
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
    head = _head(8, (1, 1), 3, SMALL)  # the shipped decoder.weight is 0
    out = head(_features(2, 8, 1))
    assert head.decoder is None and head.auxiliary_weight == 0
    images, targets = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    assert head.auxiliary_loss(out, images, targets) is None
    assert head.auxiliary_loss(out, images, targets, draw=True) is None


def test_bf16_autocast_on_cpu() -> None:
    torch.manual_seed(0)
    head = _head(8, (2, 2), 5, SMALL, _decoder([16], 8))
    images = torch.randn(2, 3, 16, 16)
    targets = torch.tensor([0, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(_features(2, 8, 2), TELEMETRY)
        scores = out.scores
        aux, _ = head.auxiliary_loss(out, images, targets)
        stats = head.telemetry(out, targets)
    assert torch.isfinite(scores).all() and torch.isfinite(aux)
    assert all(torch.isfinite(v) for v in stats.values())
    (scores.float().sum() + aux).backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


def test_from_config_reads_the_shipped_yaml() -> None:
    cfg = OmegaConf.load(HEAD_YAML).head  # a global-package file: the group sits under `head:`
    shipped = CapsuleHead.from_config(cfg, in_channels=16, feature_size=(2, 2), num_classes=3)
    assert shipped.decoder is None and shipped.auxiliary_weight == 0  # the decoder is off by default
    cfg.decoder.weight = 0.0005
    head = CapsuleHead.from_config(cfg, in_channels=16, feature_size=(2, 2), num_classes=3)
    assert head.routing_name == "dynamic"
    assert head.routing.class_caps.weight.shape == (2 * 2 * 32, 3, 16, 8)
    assert head.routing.iterations == 3 and head.decoder is not None and head.auxiliary_weight == 0.0005
    assert head(_features(1, 16, 2)).scores.shape == (1, 3)
    # a plain dict builds the same head
    torch.manual_seed(0)
    from_dict = CapsuleHead.from_config(OmegaConf.to_container(cfg), 16, (2, 2), 3)
    torch.manual_seed(0)
    from_node = CapsuleHead(cfg, 16, (2, 2), 3)
    assert from_dict.state_dict().keys() == from_node.state_dict().keys()
    for key, value in from_node.state_dict().items():
        torch.testing.assert_close(from_dict.state_dict()[key], value, msg=key)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("head.primary.types=0", "head.primary.types"),
        ("head.primary.dim=0", "head.primary.dim"),
        ("head.primary.kernel_size=0", "head.primary.kernel_size"),
        ("head.primary.stride=0", "head.primary.stride"),
        ("head.class_dim=0", "head.class_dim"),
        ("head.routing.iterations=0", "head.routing.iterations"),
        ("head.routing.logit_scale=0.0", "head.routing.logit_scale"),
        ("head.routing.final_lambda=0.0", "head.routing.final_lambda"),
        ("head.routing.name=nope", "head.routing.name"),
        ("head.init_std=0.0", "head.init_std"),
        ("head.decoder.weight=-1.0", "head.decoder.weight"),
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


@pytest.mark.parametrize("routing", sorted(ROUTINGS))
def test_wrong_feature_size_raises(routing: str) -> None:
    head = _head(8, (2, 2), 3, SMALL, routing={"name": routing})
    with pytest.raises(ValueError, match="2x2"):
        head(_features(1, 8, 3))


def test_optional_methods_read_only_the_values_they_are_given() -> None:
    # no state from the latest forward: telemetry of an earlier output stays that output's
    torch.manual_seed(0)
    head = _head(8, (2, 2), 3, SMALL)
    targets = torch.tensor([0, 2])
    first = head(_features(2, 8, 2, seed=1), TELEMETRY)
    second = head(_features(2, 8, 2, seed=2), TELEMETRY)
    late = head.telemetry(first, targets)["capsule/true_class_length"]
    torch.testing.assert_close(late, first.scores[[0, 1], [0, 2]].mean())
    assert not torch.equal(late, head.telemetry(second, targets)["capsule/true_class_length"])


# ---- every routing ------------------------------------------------------------------------------

ROUTING_NAMES = sorted(ROUTINGS)


def _routed_head(routing: str, *partial: dict[str, Any], classes: int = 5) -> CapsuleHead:
    return _head(8, (2, 2), classes, SMALL, *partial, routing={"name": routing})


def _bias_before_batchnorm(head: CapsuleHead) -> set[str]:
    """Conv biases that a BatchNorm follows: in training the norm subtracts each channel's batch mean,
    so such a bias has no effect on the output and its gradient is zero up to rounding."""
    return {f"{name}.conv.bias" for name, module in head.named_modules()
            if isinstance(module, PrimaryCapsules) and module.conv.bias is not None
            and isinstance(module.norm, torch.nn.BatchNorm2d)}


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_every_routing_gives_finite_scores_of_the_right_shape(routing: str) -> None:
    torch.manual_seed(0)
    head = _routed_head(routing)
    for measure in (Measure(), TELEMETRY):
        scores = head(_features(3, 8, 2), measure).scores
        assert scores.shape == (3, 5)
        assert torch.isfinite(scores).all()
    assert head.routing_name == routing and isinstance(head.routing, ROUTINGS[routing].build)


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_every_routing_trains_every_parameter(routing: str) -> None:
    """Two SGD steps on a random batch and a random weighting of the scores: every trainable parameter of the head gets a
    finite gradient at every step and a non-zero one at some step. Self-routing's W^r and b^r start at
    zero (uniform couplings) and still get a non-zero gradient at the first step; while they are zero
    the scores do not depend on the primary capsules, which get theirs at the second step."""
    torch.manual_seed(0)
    decoder = {} if routing == "self" else _decoder([16], 8)  # self routing has no class capsules
    head = _routed_head(routing, decoder)
    head.train()
    features = _features(4, 8, 2)
    images, targets = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 4])
    # random weights, not a plain sum: self-routing's activations sum to one over the classes (and a
    # softmax cross-entropy would not see the attention head's shared score bias)
    weights = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.SGD(head.parameters(), lr=0.1)
    reached: set[str] = set()
    for step in range(2):
        optimizer.zero_grad()
        out = head(features)
        loss = (out.scores.float() * weights).sum()
        aux = head.auxiliary_loss(out, images, targets)
        if aux is not None:
            loss = loss + head.auxiliary_weight * aux[0]
        assert torch.isfinite(loss)
        loss.backward()
        for name, param in head.named_parameters():
            assert param.grad is not None, (step, name)
            assert torch.isfinite(param.grad).all(), (step, name)
        if step == 0 and routing == "self":
            assert head.routing.weight.grad.abs().sum() > 0
            assert head.routing.bias.grad.abs().sum() > 0
        # non-zero beyond rounding: relative to the largest gradient of the step
        largest = max(float(p.grad.abs().max()) for p in head.parameters())
        reached |= {n for n, p in head.named_parameters() if float(p.grad.abs().max()) > 1e-6 * largest}
        optimizer.step()
    if head.decoder is not None:
        assert all(f"decoder.{n}" in reached for n, _ in head.decoder.named_parameters())
    unreached = {n for n, p in head.named_parameters() if p.requires_grad and n not in reached}
    assert unreached <= _bias_before_batchnorm(head), sorted(unreached)


@pytest.mark.parametrize("routing", ROUTING_NAMES)
def test_couplings_are_measured_only_when_asked(routing: str) -> None:
    torch.manual_seed(0)
    head = _routed_head(routing)
    x = _features(2, 8, 2)
    plain = head(x)
    assert "coupling_entropy" not in plain.extras and "presence" not in plain.extras
    measured = head(x, TELEMETRY)
    iterations = int(head.routing.iterations) if ROUTINGS[routing].iterations else 1
    assert iterations == (1 if routing == "self" else 3)
    assert measured.extras["coupling_entropy"].shape == (iterations,)
    # a LayerNorm'd capsule (attention) has no presence to measure; the others do
    if routing == "attention":
        assert "presence" not in measured.extras
    else:
        assert measured.extras["presence"].shape == (2, head.input_capsules)
    torch.testing.assert_close(measured.scores, plain.scores)
    # the class capsules are there on every step for the routings that have them
    has_capsules = routing != "self"
    assert ("v" in plain.extras) == has_capsules and ("v" in measured.extras) == has_capsules
    stats = head.telemetry(measured, torch.tensor([0, 1]))
    assert {k for k in stats if k.startswith("capsule/coupling_entropy/")} == {
        f"capsule/coupling_entropy/iter{k + 1}" for k in range(iterations)}


@pytest.mark.parametrize("routing", ["dynamic", "attention"])
def test_one_iteration_is_uniform_coupling(routing: str) -> None:
    torch.manual_seed(0)
    head = _routed_head(routing, {"routing": {"iterations": 1}}, classes=7)
    entropy = head(_features(3, 8, 2), TELEMETRY).extras["coupling_entropy"]
    assert entropy.shape == (1,)
    torch.testing.assert_close(entropy[0], torch.tensor(math.log(7)))


def test_telemetry_runs_on_logging_steps_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              one_thread: None) -> None:
    """grads.log_every_n_steps=2 over 4 steps: telemetry at steps 2 and 4, never in evaluation."""
    from conftest import make_cfg

    from capsexp.train import train

    calls: list[tuple[int, bool]] = []  # (training forwards so far, training mode) per call
    forwards = [0, 0]  # training forwards, evaluation forwards
    original_forward, original_telemetry = CapsuleHead.forward, CapsuleHead.telemetry

    def counting_forward(self: CapsuleHead, *args: Any, **kwargs: Any) -> Any:
        forwards[0 if self.training and torch.is_grad_enabled() else 1] += 1
        return original_forward(self, *args, **kwargs)

    def counting_telemetry(self: CapsuleHead, *args: Any, **kwargs: Any) -> Any:
        calls.append((forwards[0], self.training))
        return original_telemetry(self, *args, **kwargs)

    monkeypatch.setattr(CapsuleHead, "forward", counting_forward)
    monkeypatch.setattr(CapsuleHead, "telemetry", counting_telemetry)
    cfg = make_cfg("head=capsule", "trainer.max_steps=4", "grads.log_every_n_steps=2",
                   "trainer.log_every_n_steps=1")
    train(cfg, run_dir=tmp_path / "run")
    assert forwards[0] == 4 and forwards[1] > 0  # four steps, and an evaluation
    assert calls == [(2, True), (4, True)]
