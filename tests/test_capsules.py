"""The capsule mathematics and loss modules, checked against independent formulas."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from capsexp.capsules import coupling_entropy, dynamic_routing, margin_loss, spread_loss, squash
from capsexp.models.losses import build_loss


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _u_hat(shape: tuple[int, ...] = (2, 5, 3, 4), seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=_generator(seed), dtype=torch.float64)


# --------------------------------------------------------------------------------- squash


def test_squash_matches_formula_and_keeps_direction() -> None:
    s = torch.randn(64, 7, generator=_generator(1), dtype=torch.float64) * 3
    norm = torch.linalg.vector_norm(s, dim=-1, keepdim=True)
    expected = norm**2 / (1 + norm**2) * s / norm
    out = squash(s)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-9)
    out_norm = torch.linalg.vector_norm(out, dim=-1)
    assert (out_norm < 1).all()
    cosine = F.cosine_similarity(out, s, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))


def test_squash_of_long_and_short_vectors() -> None:
    s = torch.tensor([[1e4, 0.0], [1e-3, 0.0]], dtype=torch.float64)
    lengths = torch.linalg.vector_norm(squash(s), dim=-1)
    assert 0.999 < lengths[0] < 1
    assert lengths[1] < 1e-5


def test_squash_other_dim() -> None:
    s = torch.randn(3, 5, 2, generator=_generator(2), dtype=torch.float64)
    torch.testing.assert_close(squash(s, dim=1), squash(s.transpose(1, 2)).transpose(1, 2))


def test_squash_finite_output_and_gradient_at_zero() -> None:
    s = torch.zeros(4, 8, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 8, generator=_generator(3), dtype=torch.float64)
    out = squash(s)
    assert torch.isfinite(out).all() and (out == 0).all()
    (out * weights).sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_squash_of_a_zero_half_precision_vector_is_zero(dtype: torch.dtype) -> None:
    out = squash(torch.zeros(3, 8, dtype=dtype))
    assert out.dtype == dtype
    assert torch.isfinite(out).all() and (out == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_squash_matches_the_float32_formula(dtype: torch.dtype) -> None:
    # lengths from 1e-3 to 1e3: the squared length of the longest overflows float16 (max 65504)
    scale = torch.logspace(-3, 3, 64, dtype=torch.float64).unsqueeze(1)
    s = (torch.randn(64, 8, generator=_generator(5), dtype=torch.float64) * scale).to(dtype)
    wide = s.double()
    norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True)
    expected = norm**2 / (1 + norm**2) * wide / norm
    out = squash(s)
    assert out.dtype == dtype and torch.isfinite(out).all()
    # one rounding of each output element to the half-precision type, no more
    tol = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 1e-3)


# --------------------------------------------------------------------------------- routing


def _reference_routing(u_hat: torch.Tensor, iterations: int) -> tuple[torch.Tensor, list]:
    """Procedure 1 of Sabour et al. 2017 with explicit loops over batch, i and j."""
    batch, inputs, outputs, dim = u_hat.shape
    v = torch.zeros(batch, outputs, dim, dtype=u_hat.dtype)
    all_c = []
    for n in range(batch):
        b = [[0.0] * outputs for _ in range(inputs)]
        per_iteration = []
        for r in range(iterations):
            c = []
            for i in range(inputs):
                exps = [math.exp(b[i][j]) for j in range(outputs)]
                c.append([e / sum(exps) for e in exps])
            per_iteration.append(c)
            for j in range(outputs):
                s_j = torch.zeros(dim, dtype=u_hat.dtype)
                for i in range(inputs):
                    s_j = s_j + c[i][j] * u_hat[n, i, j]
                sq = float((s_j**2).sum())
                v[n, j] = sq / (1 + sq) * s_j / math.sqrt(sq)
            if r < iterations - 1:
                for i in range(inputs):
                    for j in range(outputs):
                        b[i][j] += float((u_hat[n, i, j] * v[n, j]).sum())
        all_c.append(per_iteration)
    return v, all_c


@pytest.mark.parametrize("iterations", [1, 2, 3, 4])
def test_routing_matches_slow_reference(iterations: int) -> None:
    u_hat = _u_hat((2, 4, 3, 5), seed=iterations)
    v, couplings = dynamic_routing(u_hat, iterations, return_couplings=True)
    v_ref, c_ref = _reference_routing(u_hat, iterations)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-9)
    # c_ref is [batch][iteration][i][j]; the function returns [iteration, batch, i, j].
    c_ref_tensor = torch.tensor(c_ref, dtype=torch.float64).transpose(0, 1)
    torch.testing.assert_close(couplings, c_ref_tensor)


def test_couplings_sum_to_one_over_output_capsules_and_are_detached() -> None:
    u_hat = _u_hat().requires_grad_()
    _, couplings = dynamic_routing(u_hat, 3, return_couplings=True)
    assert couplings.shape == (3, 2, 5, 3)
    assert not couplings.requires_grad
    sums = couplings.sum(dim=-1)
    torch.testing.assert_close(sums, torch.ones_like(sums))
    # Routing actually moves the couplings away from uniform after the first iteration.
    assert not torch.allclose(couplings[-1], torch.full_like(couplings[-1], 1 / 3))


def test_one_iteration_is_uniform_coupling() -> None:
    u_hat = _u_hat()
    outputs = u_hat.shape[2]
    expected = squash(u_hat.sum(dim=1) / outputs)  # s_j = sum_i (1/J) u_hat_j|i
    torch.testing.assert_close(dynamic_routing(u_hat, 1), expected)


def test_routing_keeps_no_state_between_calls() -> None:
    u_hat = _u_hat()
    first = dynamic_routing(u_hat, 3)
    dynamic_routing(_u_hat(seed=9), 3)  # a different input in between must not matter
    torch.testing.assert_close(dynamic_routing(u_hat, 3), first, rtol=0, atol=0)


@pytest.mark.parametrize("iterations", [0, -1])
def test_routing_rejects_bad_iterations(iterations: int) -> None:
    with pytest.raises(ValueError, match="iterations"):
        dynamic_routing(_u_hat(), iterations)


@pytest.mark.parametrize("iterations", [1, 3])
def test_gradcheck_through_all_iterations(iterations: int) -> None:
    u_hat = _u_hat((1, 3, 2, 3), seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: dynamic_routing(u, iterations), (u_hat,))


def test_gradcheck_detached_routing_with_one_iteration() -> None:
    # With one iteration the couplings are 1/J whatever u_hat is, so detaching them changes
    # nothing and the detached gradient must be the true derivative.
    u_hat = _u_hat((1, 3, 2, 3), seed=5).requires_grad_()
    assert torch.autograd.gradcheck(lambda u: dynamic_routing(u, 1, detach=True), (u_hat,))


def _constant_coupling_v(u_hat: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``squash(sum_i c_ij u_hat_j|i)`` written out without the library's squash."""
    s = (c[..., None] * u_hat).sum(dim=1)
    sq = (s**2).sum(dim=-1, keepdim=True)
    return sq / (1 + sq) * s / torch.sqrt(sq)


def test_detached_routing_gradient_is_the_constant_coupling_gradient() -> None:
    u_hat = _u_hat((2, 4, 3, 5), seed=6).requires_grad_()
    weights = torch.randn(2, 3, 5, generator=_generator(7), dtype=torch.float64)
    v, couplings = dynamic_routing(u_hat, 3, detach=True, return_couplings=True)
    (grad_detached,) = torch.autograd.grad((v * weights).sum(), u_hat)

    # the couplings of the last iteration, from the loop-based reference: constants, no graph
    per_sample = _reference_routing(u_hat.detach(), 3)[1]
    c_const = torch.tensor([c[-1] for c in per_sample], dtype=u_hat.dtype)
    torch.testing.assert_close(couplings[-1], c_const)
    v_const = _constant_coupling_v(u_hat, c_const)
    torch.testing.assert_close(v, v_const)
    (grad_const,) = torch.autograd.grad((v_const * weights).sum(), u_hat)
    torch.testing.assert_close(grad_detached, grad_const)

    v_full = dynamic_routing(u_hat, 3, detach=False)
    torch.testing.assert_close(v_full, v)  # same forward value
    (grad_full,) = torch.autograd.grad((v_full * weights).sum(), u_hat)
    assert not torch.allclose(grad_full, grad_const, rtol=1e-4, atol=1e-8)


def test_detached_routing_jacobian_matches_frozen_coupling_finite_differences() -> None:
    # A gradcheck of the detached path: its analytic Jacobian against central differences of
    # the same forward with the couplings frozen at their values for this input.
    u_hat = _u_hat((1, 3, 2, 3), seed=8)
    _, couplings = dynamic_routing(u_hat, 3, detach=True, return_couplings=True)
    analytic = torch.autograd.functional.jacobian(
        lambda u: dynamic_routing(u, 3, detach=True), u_hat
    ).reshape(-1, u_hat.numel())
    step = 1e-6
    numeric = torch.empty_like(analytic)
    for k in range(u_hat.numel()):
        delta = torch.zeros(u_hat.numel(), dtype=u_hat.dtype)
        delta[k] = step
        delta = delta.view_as(u_hat)
        plus = _constant_coupling_v(u_hat + delta, couplings[-1])
        minus = _constant_coupling_v(u_hat - delta, couplings[-1])
        numeric[:, k] = ((plus - minus) / (2 * step)).flatten()
    torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-7)


def test_routing_low_precision_runs_in_float32() -> None:
    u_hat = _u_hat().to(torch.bfloat16)
    v = dynamic_routing(u_hat, 3)
    assert v.dtype == torch.float32
    torch.testing.assert_close(v, dynamic_routing(u_hat.float(), 3))


def test_routing_under_autocast_stays_float32() -> None:
    """Autocast would run the routing einsums in bf16; routing switches it off inside."""
    u_hat = _u_hat().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, couplings = dynamic_routing(u_hat, 3, return_couplings=True)
    assert v.dtype == couplings.dtype == torch.float32
    v_ref, c_ref = dynamic_routing(u_hat, 3, return_couplings=True)
    torch.testing.assert_close(v, v_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(couplings, c_ref, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------- losses


def test_margin_loss_hand_computed() -> None:
    lengths = torch.tensor([[0.95, 0.3, 0.05], [0.5, 0.2, 0.8]])
    targets = torch.tensor([0, 2])
    # sample 0: true 0.95 >= 0.9 -> 0; 0.5*(0.3-0.1)^2 = 0.02; 0.05 <= 0.1 -> 0.   total 0.02
    # sample 1: true (0.9-0.8)^2 = 0.01; 0.5*(0.5-0.1)^2 = 0.08; 0.5*(0.2-0.1)^2 = 0.005
    #           total 0.095.  batch mean (0.02 + 0.095) / 2 = 0.0575
    assert margin_loss(lengths, targets).item() == pytest.approx(0.0575, abs=1e-6)


def test_margin_loss_custom_parameters_hand_computed() -> None:
    lengths = torch.tensor([[0.5, 0.5]])
    # true class 1: (0.8-0.5)^2 = 0.09; class 0: 1.0*(0.5-0.2)^2 = 0.09; total 0.18
    loss = margin_loss(lengths, torch.tensor([1]), m_plus=0.8, m_minus=0.2, lambda_=1.0)
    assert loss.item() == pytest.approx(0.18, abs=1e-6)


def test_spread_loss_hand_computed() -> None:
    scores = torch.tensor([[0.9, 0.5, 0.2], [0.1, 0.3, 0.4]])
    targets = torch.tensor([0, 1])
    # margin 0.6. sample 0 (a_t=0.9): (0.6-0.4)^2 = 0.04; 0.6-0.7 < 0 -> 0.   total 0.04
    # sample 1 (a_t=0.3): (0.6-0.2)^2 = 0.16; (0.6+0.1)^2 = 0.49.            total 0.65
    # batch mean (0.04 + 0.65) / 2 = 0.345
    assert spread_loss(scores, targets, 0.6).item() == pytest.approx(0.345, abs=1e-6)


def test_coupling_entropy_known_values() -> None:
    uniform = torch.full((2, 3, 4), 0.25)
    torch.testing.assert_close(coupling_entropy(uniform), torch.tensor(math.log(4)))
    one_hot = F.one_hot(torch.tensor([[0, 3, 1]]), 4).float()
    torch.testing.assert_close(coupling_entropy(one_hot), torch.tensor(0.0))
    mixed = torch.stack([uniform[0, 0], torch.tensor([0.5, 0.5, 0.0, 0.0])])  # log4, log2
    expected = torch.tensor((math.log(4) + math.log(2)) / 2)
    torch.testing.assert_close(coupling_entropy(mixed), expected)
    assert coupling_entropy(uniform).dim() == 0


# ----------------------------------------------------------------------------- loss modules

_SCORES = torch.tensor([[0.9, 0.5, 0.2], [0.1, 0.3, 0.4]])
_TARGETS = torch.tensor([0, 1])


def test_ce_fixed_scale() -> None:
    cfg = OmegaConf.create(
        {"name": "ce", "scale": 5.0, "label_smoothing": 0.1, "reconstruction_weight": 0.0}
    )
    loss = build_loss(cfg)
    expected = F.cross_entropy(_SCORES * 5.0, _TARGETS, label_smoothing=0.1)
    torch.testing.assert_close(loss(_SCORES, _TARGETS, 0.3), expected)
    assert not list(loss.parameters())


def test_ce_learned_scale_is_a_positive_parameter() -> None:
    cfg = OmegaConf.create(
        {"name": "ce", "scale": "learned", "label_smoothing": 0.0, "reconstruction_weight": 0.0}
    )
    loss = build_loss(cfg)
    params = list(loss.parameters())
    assert len(params) == 1
    torch.testing.assert_close(loss.scale, torch.tensor(10.0))
    value = loss(_SCORES, _TARGETS, 0.0)
    torch.testing.assert_close(value, F.cross_entropy(_SCORES * 10.0, _TARGETS))
    value.backward()
    assert params[0].grad is not None and torch.isfinite(params[0].grad).all()
    with torch.no_grad():
        params[0].sub_(100.0)  # a huge step still leaves the scale positive
    assert loss.scale > 0


def test_margin_loss_module() -> None:
    cfg = OmegaConf.create(
        {"name": "margin", "m_plus": 0.9, "m_minus": 0.1, "lambda_": 0.5,
         "reconstruction_weight": 0.0005}
    )
    loss = build_loss(cfg)
    torch.testing.assert_close(loss(_SCORES, _TARGETS, 0.7), margin_loss(_SCORES, _TARGETS))


def test_spread_loss_anneals_with_progress() -> None:
    cfg = OmegaConf.create(
        {"name": "spread", "m_start": 0.2, "m_end": 0.9, "reconstruction_weight": 0.0}
    )
    loss = build_loss(cfg)
    start, middle, end = (loss(_SCORES, _TARGETS, p) for p in (0.0, 0.5, 1.0))
    torch.testing.assert_close(start, spread_loss(_SCORES, _TARGETS, 0.2))
    torch.testing.assert_close(middle, spread_loss(_SCORES, _TARGETS, 0.55))
    torch.testing.assert_close(end, spread_loss(_SCORES, _TARGETS, 0.9))
    assert start < middle < end


@pytest.mark.parametrize(("override", "message"), [
    ("loss.name=x", "loss.name='x' is not allowed; it must be ce, margin or spread (choose one with loss=<option>)."),
    ("loss.scale=big", "loss.scale='big' is not allowed; it must be a positive number or learned."),
])
def test_bad_loss_settings_are_one_sentence(override: str, message: str) -> None:
    from conftest import make_cfg

    from capsexp.config.validation import validate
    from capsexp.errors import UserError

    with pytest.raises(UserError) as caught:
        validate(make_cfg(override))
    assert str(caught.value) == message
