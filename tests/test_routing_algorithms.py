"""Attention, self and EM routing, checked against float64 references written from the papers.

Each reference below is written directly from the equations with loops over capsules (no call
into capsexp), and compared with the module on random inputs for the output and for the
gradient of a random linear functional of the output with respect to every input. Mutated
references (an error planted in the reference) show that the comparison would catch that
error in the module.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable, Iterable, Sequence

import pytest
import torch
from torch import Tensor, nn

from capsexp.models.routing_algorithms import (
    EM_VARIANCE_EPS,
    attention_routing,
    em_routing,
    self_routing,
)

TOL = 1e-10  # absolute and relative, for float64
CLEARLY_DIFFERENT = 1e-6  # a planted error must move some output by more than this
B, I, J, D, C, P = 2, 5, 3, 4, 6, 16
LAYER_NORM_EPS = 1e-5  # torch's default, used by F.layer_norm and nn.LayerNorm
VARIANCE_EPS = 1e-8  # the eps the EM docstring promises on sigma^2


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return (torch.randn(*shape, generator=_generator(seed), dtype=torch.float64) * scale).requires_grad_()


def _activations(*shape: int, seed: int) -> Tensor:
    logits = torch.randn(*shape, generator=_generator(seed), dtype=torch.float64)
    return torch.sigmoid(logits).requires_grad_()  # in (0, 1), a leaf


def _functional(outputs: tuple[Tensor, ...], seed: int) -> Tensor:
    """A random linear functional of the outputs (fixed weights per seed)."""
    total = torch.zeros((), dtype=torch.float64)
    for k, out in enumerate(outputs):
        weights = torch.randn(out.shape, generator=_generator(seed + 100 * k), dtype=torch.float64)
        total = total + (out * weights).sum()
    return total


def _assert_same_values_and_gradients(
    module_out: tuple[Tensor, ...], reference_out: tuple[Tensor, ...], inputs: Sequence[Tensor]
) -> None:
    for got, expected in zip(module_out, reference_out):
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)
    got_grads = torch.autograd.grad(_functional(module_out, 7), inputs)
    expected_grads = torch.autograd.grad(_functional(reference_out, 7), inputs)
    for got, expected in zip(got_grads, expected_grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=TOL, atol=TOL)


def _max_difference(a: tuple[Tensor, ...], b: tuple[Tensor, ...]) -> float:
    return max(float((x - y).detach().abs().max()) for x, y in zip(a, b))


def _sum(terms: Iterable[Tensor]) -> Tensor:
    return functools.reduce(operator.add, terms)


def _softmax(values: list[Tensor]) -> list[Tensor]:
    exps = [torch.exp(v) for v in values]
    total = _sum(exps)
    return [e / total for e in exps]


def _stack3(rows: list[list[list[Tensor]]]) -> Tensor:
    return torch.stack([torch.stack([torch.stack(r) for r in plane]) for plane in rows])


# ------------------------------------------------------------------------ attention routing


def _layer_norm(s: Tensor, gamma: Tensor | None = None, beta: Tensor | None = None) -> Tensor:
    centred = s - s.mean()
    out = centred / torch.sqrt(centred.pow(2).mean() + LAYER_NORM_EPS)
    if gamma is not None and beta is not None:
        out = out * gamma + beta
    return out


def reference_attention(
    u_hat: Tensor,
    iterations: int,
    normalise: Callable[[Tensor], Tensor] = _layer_norm,
    scaled: bool = True,
    softmax_over: str = "j",
) -> tuple[Tensor, Tensor]:
    """Tsai et al. 2020, Procedure 1, with the 1/sqrt(D) scale; returns (v, couplings)."""
    batch, inputs, outputs, dim = u_hat.shape
    scale = 1 / math.sqrt(dim) if scaled else 1.0
    c = [[[torch.tensor(1 / outputs, dtype=torch.float64)] * outputs for _ in range(inputs)]
         for _ in range(batch)]
    history = []
    v: list[list[Tensor]] = []
    for step in range(iterations):
        if step > 0:
            agreement = [[[torch.dot(u_hat[b, i, j], v[b][j]) * scale for j in range(outputs)]
                          for i in range(inputs)] for b in range(batch)]
            for b in range(batch):
                if softmax_over == "j":
                    for i in range(inputs):
                        c[b][i] = _softmax(agreement[b][i])
                else:  # planted error: each output distributes itself over the inputs
                    for j in range(outputs):
                        column = _softmax([agreement[b][i][j] for i in range(inputs)])
                        for i in range(inputs):
                            c[b][i][j] = column[i]
        history.append(_stack3(c).detach())
        v = [[normalise(_sum(c[b][i][j] * u_hat[b, i, j] for i in range(inputs)))
              for j in range(outputs)] for b in range(batch)]
    return torch.stack([torch.stack(row) for row in v]), torch.stack(history)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_attention_routing_matches_the_reference(iterations: int) -> None:
    u_hat = _randn(B, I, J, D, seed=1, scale=1.5)
    v, couplings = attention_routing(u_hat, iterations, return_couplings=True)
    expected_v, expected_couplings = reference_attention(u_hat, iterations)
    _assert_same_values_and_gradients((v,), (expected_v,), [u_hat])
    assert couplings.shape == (iterations, B, I, J) and not couplings.requires_grad
    torch.testing.assert_close(couplings, expected_couplings, rtol=TOL, atol=TOL)
    torch.testing.assert_close(attention_routing(u_hat, iterations), v, rtol=0, atol=0)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_attention_routing_applies_the_given_norm(iterations: int) -> None:
    u_hat = _randn(B, I, J, D, seed=2)
    norm = nn.LayerNorm(D, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D, generator=_generator(3), dtype=torch.float64))
        norm.bias.copy_(torch.randn(D, generator=_generator(4), dtype=torch.float64))
    v = attention_routing(u_hat, iterations, norm=norm)
    assert isinstance(v, Tensor)
    expected, _ = reference_attention(
        u_hat, iterations, normalise=lambda s: _layer_norm(s, norm.weight, norm.bias)
    )
    _assert_same_values_and_gradients((v,), (expected,), [u_hat, norm.weight, norm.bias])


@pytest.mark.parametrize("iterations", [2, 3])
@pytest.mark.parametrize("mutation", ["softmax over inputs", "no sqrt(D) scale"])
def test_attention_comparison_catches_planted_errors(iterations: int, mutation: str) -> None:
    u_hat = _randn(B, I, J, D, seed=5, scale=1.5)
    v = attention_routing(u_hat, iterations)
    assert isinstance(v, Tensor)
    if mutation == "softmax over inputs":
        mutated, _ = reference_attention(u_hat, iterations, softmax_over="i")
    else:
        mutated, _ = reference_attention(u_hat, iterations, scaled=False)
    assert _max_difference((v,), (mutated,)) > CLEARLY_DIFFERENT


def test_attention_one_iteration_is_exactly_uniform() -> None:
    u_hat = _randn(B, I, J, D, seed=6)
    v, couplings = attention_routing(u_hat, 1, return_couplings=True)
    assert couplings.shape == (1, B, I, J)
    assert (couplings == torch.full_like(couplings, 1 / J)).all()
    # s_j = sum_i u_hat_j|i / J (a sum, not the mean over the inputs)
    expected = torch.nn.functional.layer_norm(u_hat.detach().sum(dim=1) / J, (D,))
    torch.testing.assert_close(v.detach(), expected, rtol=TOL, atol=TOL)


# ------------------------------------------------------------------------------ self routing


def reference_self_routing(
    pose: Tensor, a: Tensor, weight: Tensor, bias: Tensor, softmax_over: str = "j"
) -> tuple[Tensor, Tensor]:
    """Hahn et al. 2019, eqs. 2-3: returns (a_out, couplings)."""
    batch, inputs, _ = pose.shape
    outputs = weight.shape[1]
    logits = [[[torch.dot(weight[i, j], pose[b, i]) + bias[i, j] for j in range(outputs)]
               for i in range(inputs)] for b in range(batch)]
    if softmax_over == "j":
        c = [[_softmax(logits[b][i]) for i in range(inputs)] for b in range(batch)]
    else:  # planted error
        columns = [[_softmax([logits[b][i][j] for i in range(inputs)]) for j in range(outputs)]
                   for b in range(batch)]
        c = [[[columns[b][j][i] for j in range(outputs)] for i in range(inputs)]
             for b in range(batch)]
    a_out = [[_sum(a[b, i] * c[b][i][j] for i in range(inputs)) / _sum(a[b, i] for i in range(inputs))
              for j in range(outputs)] for b in range(batch)]
    return torch.stack([torch.stack(row) for row in a_out]), _stack3(c).detach()


Inputs = tuple[Tensor, Tensor, Tensor, Tensor]


def _self_inputs(seed: int = 10) -> Inputs:
    return (
        _randn(B, I, C, seed=seed),
        _activations(B, I, seed=seed + 1),
        _randn(I, J, C, seed=seed + 2),
        _randn(I, J, seed=seed + 3),
    )


def test_self_routing_matches_the_reference() -> None:
    inputs = _self_inputs()
    a_out, couplings = self_routing(*inputs, return_couplings=True)
    expected, expected_couplings = reference_self_routing(*inputs)
    _assert_same_values_and_gradients((a_out,), (expected,), inputs)
    assert couplings.shape == (1, B, I, J) and not couplings.requires_grad
    torch.testing.assert_close(couplings[0], expected_couplings, rtol=TOL, atol=TOL)
    torch.testing.assert_close(self_routing(*inputs), a_out, rtol=0, atol=0)


def test_self_routing_comparison_catches_softmax_over_the_wrong_axis() -> None:
    inputs = _self_inputs()
    mutated, _ = reference_self_routing(*inputs, softmax_over="i")
    a_out = self_routing(*inputs)
    assert isinstance(a_out, Tensor)
    assert _max_difference((a_out,), (mutated,)) > CLEARLY_DIFFERENT


def test_self_routing_with_zero_routing_weights_is_uniform() -> None:
    pose, a, weight, bias = _self_inputs()
    a_out, couplings = self_routing(pose, a, torch.zeros_like(weight), torch.zeros_like(bias),
                                    return_couplings=True)
    assert (couplings == 1 / J).all()
    # a_j = sum_i a_i (1/J) / sum_i a_i = 1/J whatever the input activations
    torch.testing.assert_close(a_out, torch.full((B, J), 1 / J, dtype=torch.float64),
                               rtol=TOL, atol=TOL)


def test_self_routing_activations_sum_to_one_over_outputs() -> None:
    a_out = self_routing(*_self_inputs(seed=20))
    assert isinstance(a_out, Tensor)
    torch.testing.assert_close(a_out.sum(dim=1), torch.ones(B, dtype=torch.float64),
                               rtol=TOL, atol=TOL)


def test_self_routing_without_active_inputs_is_zero_not_nan() -> None:
    pose, a, weight, bias = _self_inputs()
    a_out = self_routing(pose, torch.zeros_like(a), weight, bias)
    assert isinstance(a_out, Tensor)
    assert (a_out == 0).all()


# -------------------------------------------------------------------------------- EM routing


def reference_em(
    votes: Tensor,
    a_in: Tensor,
    beta_u: Tensor,
    beta_a: Tensor,
    iterations: int,
    final_lambda: float,
    lambda_shift: int = 0,
    softmax_over: str = "j",
) -> tuple[Tensor, Tensor, Tensor]:
    """Hinton et al. 2018, Procedure 1, lambda_t = final (1 - 0.95^t): (mu, a_out, R per step)."""
    batch, inputs, outputs, size = votes.shape
    r = [[[torch.tensor(1 / outputs, dtype=torch.float64)] * outputs for _ in range(inputs)]
         for _ in range(batch)]
    history = []
    for t in range(1, iterations + 1):
        history.append(_stack3(r).detach())
        lam = final_lambda * (1 - 0.95 ** (t + lambda_shift))
        mu, variance, a_out = [], [], []
        for b in range(batch):
            mu_b, variance_b, a_b = [], [], []
            for j in range(outputs):
                weighted = [r[b][i][j] * a_in[b, i] for i in range(inputs)]  # M-step: R_ij a_i
                mass = _sum(weighted)
                mean = _sum(w * votes[b, i, j] for i, w in enumerate(weighted)) / mass
                var = _sum(w * (votes[b, i, j] - mean) ** 2 for i, w in enumerate(weighted)) / mass
                var = var + VARIANCE_EPS
                cost = (beta_u[j] + torch.log(torch.sqrt(var))) * mass  # [P]
                a_b.append(1 / (1 + torch.exp(-lam * (beta_a[j] - cost.sum()))))
                mu_b.append(mean)
                variance_b.append(var)
            mu.append(mu_b)
            variance.append(variance_b)
            a_out.append(a_b)
        if t == iterations:
            break
        # E-step: R_ij = a_j p_ij / sum_k a_k p_ik with a diagonal Gaussian p
        p = [[[torch.prod(torch.exp(-(votes[b, i, j] - mu[b][j]) ** 2 / (2 * variance[b][j]))
                          / torch.sqrt(2 * math.pi * variance[b][j]))
               for j in range(outputs)] for i in range(inputs)] for b in range(batch)]
        if softmax_over == "j":
            for b in range(batch):
                for i in range(inputs):
                    total = _sum(a_out[b][k] * p[b][i][k] for k in range(outputs))
                    r[b][i] = [a_out[b][j] * p[b][i][j] / total for j in range(outputs)]
        else:  # planted error: normalised over the inputs
            for b in range(batch):
                for j in range(outputs):
                    total = _sum(a_out[b][j] * p[b][k][j] for k in range(inputs))
                    for i in range(inputs):
                        r[b][i][j] = a_out[b][j] * p[b][i][j] / total
    pose = torch.stack([torch.stack(row) for row in mu])
    activations = torch.stack([torch.stack(row) for row in a_out])
    return pose, activations, torch.stack(history)


def _em_inputs(seed: int = 30) -> Inputs:
    return (
        _randn(B, I, J, P, seed=seed),
        _activations(B, I, seed=seed + 1),
        _randn(J, seed=seed + 2, scale=0.5),
        _randn(J, seed=seed + 3),
    )


def test_em_variance_eps_is_the_documented_one() -> None:
    assert EM_VARIANCE_EPS == VARIANCE_EPS


@pytest.mark.parametrize("final_lambda", [0.01, 1.0])
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_em_routing_matches_the_reference(iterations: int, final_lambda: float) -> None:
    inputs = _em_inputs()
    pose, a_out, couplings = em_routing(*inputs, iterations, final_lambda=final_lambda,
                                        return_couplings=True)
    expected_pose, expected_a, expected_couplings = reference_em(*inputs, iterations, final_lambda)
    assert pose.shape == (B, J, P) and a_out.shape == (B, J)
    _assert_same_values_and_gradients((pose, a_out), (expected_pose, expected_a), inputs)
    assert couplings.shape == (iterations, B, I, J) and not couplings.requires_grad
    torch.testing.assert_close(couplings, expected_couplings, rtol=TOL, atol=TOL)
    assert (couplings[0] == 1 / J).all()
    torch.testing.assert_close(couplings.sum(dim=-1), torch.ones(iterations, B, I, dtype=torch.float64),
                               rtol=TOL, atol=TOL)
    plain = em_routing(*inputs, iterations, final_lambda=final_lambda)
    torch.testing.assert_close(plain, (pose, a_out), rtol=0, atol=0)


def test_em_routing_default_lambda_is_001() -> None:
    inputs = _em_inputs(seed=40)
    torch.testing.assert_close(em_routing(*inputs, 2), em_routing(*inputs, 2, final_lambda=0.01),
                               rtol=0, atol=0)


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("shift", [-1, 1])
def test_em_comparison_catches_a_schedule_off_by_one_step(iterations: int, shift: int) -> None:
    inputs = _em_inputs()
    result = em_routing(*inputs, iterations)
    mutated = reference_em(*inputs, iterations, 0.01, lambda_shift=shift)
    assert _max_difference(result, mutated[:2]) > CLEARLY_DIFFERENT


@pytest.mark.parametrize("iterations", [2, 3])
def test_em_comparison_catches_softmax_over_the_wrong_axis(iterations: int) -> None:
    inputs = _em_inputs()
    result = em_routing(*inputs, iterations, final_lambda=1.0)
    mutated = reference_em(*inputs, iterations, 1.0, softmax_over="i")
    assert _max_difference(result, mutated[:2]) > CLEARLY_DIFFERENT


def test_em_routing_without_active_inputs_is_finite() -> None:
    votes, a_in, beta_u, beta_a = _em_inputs()
    pose, a_out = em_routing(votes, torch.zeros_like(a_in), beta_u, beta_a, 3)
    assert torch.isfinite(pose).all() and torch.isfinite(a_out).all()


# ------------------------------------------------------------- precision and validation


def _route(name: str, cast: Callable[[Tensor], Tensor]) -> tuple[Tensor, ...]:
    """Run one routing on fixed random inputs passed through ``cast`` (without gradients)."""
    if name == "attention":
        u_hat = cast(_randn(B, I, J, D, seed=50).detach())
        v = attention_routing(u_hat, 3)
        assert isinstance(v, Tensor)
        return (v,)
    if name == "self":
        pose, a, weight, bias = (cast(t.detach()) for t in _self_inputs(seed=51))
        a_out = self_routing(pose, a, weight, bias)
        assert isinstance(a_out, Tensor)
        return (a_out,)
    votes, a_in, beta_u, beta_a = (cast(t.detach()) for t in _em_inputs(seed=52))
    return em_routing(votes, a_in, beta_u, beta_a, 3, final_lambda=1.0)


@pytest.mark.parametrize("name", ["attention", "self", "em"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_routed_in_float32(name: str, dtype: torch.dtype) -> None:
    low = _route(name, lambda t: t.to(dtype))
    for out in low:
        assert out.dtype == torch.float32 and torch.isfinite(out).all()
    # the same rounded inputs given as float32: exactly the computation done inside
    widened = _route(name, lambda t: t.to(dtype).float())
    torch.testing.assert_close(low, widened, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["attention", "self", "em"])
def test_autocast_is_switched_off_inside(name: str) -> None:
    plain = _route(name, lambda t: t.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = _route(name, lambda t: t.float())
    for out in inside:
        assert out.dtype == torch.float32
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


def _bad_calls() -> dict[str, Callable[[], object]]:
    u_hat = torch.randn(B, I, J, D)
    pose, a, weight, bias = (t.detach().float() for t in _self_inputs())
    votes, a_in, beta_u, beta_a = (t.detach().float() for t in _em_inputs())
    return {
        "attention 3-d votes": lambda: attention_routing(u_hat[0], 2),
        "attention no outputs": lambda: attention_routing(u_hat[:, :, :0], 2),
        "attention 0 iterations": lambda: attention_routing(u_hat, 0),
        "attention float iterations": lambda: attention_routing(u_hat, 2.0),
        "attention bool iterations": lambda: attention_routing(u_hat, True),
        "self 2-d pose": lambda: self_routing(pose[0], a, weight, bias),
        "self activation shape": lambda: self_routing(pose, a[:, :-1], weight, bias),
        "self weight inputs": lambda: self_routing(pose, a, weight[:-1], bias),
        "self weight channels": lambda: self_routing(pose, a, weight[..., :-1], bias),
        "self bias shape": lambda: self_routing(pose, a, weight, bias[:, :-1]),
        "self integer pose": lambda: self_routing(pose.long(), a.long(), weight.long(), bias.long()),
        "em 3-d votes": lambda: em_routing(votes[0], a_in, beta_u, beta_a, 2),
        "em activation shape": lambda: em_routing(votes, a_in[:1], beta_u, beta_a, 2),
        "em beta_u shape": lambda: em_routing(votes, a_in, beta_u[:-1], beta_a, 2),
        "em beta_a shape": lambda: em_routing(votes, a_in, beta_u, beta_a[None], 2),
        "em 0 iterations": lambda: em_routing(votes, a_in, beta_u, beta_a, 0),
        "em zero lambda": lambda: em_routing(votes, a_in, beta_u, beta_a, 2, final_lambda=0.0),
        "em nan lambda": lambda: em_routing(votes, a_in, beta_u, beta_a, 2, final_lambda=math.nan),
    }


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_bad_arguments_raise_value_error(case: str) -> None:
    with pytest.raises(ValueError):
        _bad_calls()[case]()
