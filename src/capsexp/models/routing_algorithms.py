"""The routing algorithms as pure functions: dynamic, attention, self and EM routing.

They are stateless (nothing is kept between calls, no
parameters are owned here: a head passes its own), so each can be checked against an
independent formula. Shapes:

* ``I`` input capsules, ``J`` output capsules, batch ``B``;
* votes (predictions) ``[B, I, J, D]``: what input capsule ``i`` predicts for output ``j``;
* couplings ``[B, I, J]``: how much of input ``i`` goes to output ``j``, summing to one over
  ``J`` (each input distributes itself over the outputs);
* with ``return_couplings`` the couplings come back detached, stacked over iterations as
  ``[iterations, B, I, J]``, exactly like ``dynamic_routing``.

Half and bfloat16 inputs are routed in float32 with autocast switched off inside, and the
outputs stay float32: softmaxes over accumulated agreements, log-variances and sums over many
input capsules lose too much in 8- or 11-bit mantissas. Tensors of mixed dtypes are promoted
to a common dtype first (e.g. float16 votes with float32 parameters route in float32).

Only dynamic routing squashes its output: attention routing normalises with a layer norm, and
self and EM routing carry presence in a separate activation instead of a vector length.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from capsexp.models.capsules import _routing_dtype, squash

# Added to the EM variances sigma^2: a capsule whose votes all agree (or that receives a
# single input) would otherwise get log sigma = -inf and an infinite Gaussian density. 1e-8 is
# far below the spread of votes of order one, so it changes nothing there, and it bounds
# log sigma_h below by about -9.2 so that costs and gradients stay finite.
EM_VARIANCE_EPS = 1e-8
# The per-step factor of the EM inverse-temperature schedule lambda_t = final * (1 - 0.95^t).
EM_LAMBDA_DECAY = 0.95


@overload
def dynamic_routing(u_hat: Tensor, iterations: int, detach: bool = ..., logit_scale: float = ...,
                    return_couplings: Literal[False] = ...) -> Tensor: ...
@overload
def dynamic_routing(u_hat: Tensor, iterations: int, detach: bool = ..., logit_scale: float = ..., *,
                    return_couplings: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def dynamic_routing(u_hat: Tensor, iterations: int, detach: bool = ..., logit_scale: float = ...,
                    return_couplings: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def dynamic_routing(
    u_hat: Tensor,
    iterations: int,
    detach: bool = False,
    logit_scale: float = 1.0,
    return_couplings: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Routing by agreement (Sabour et al. 2017, Procedure 1).

    Args:
        u_hat: predictions ``[B, I, J, D]`` of each input capsule ``i`` for output capsule ``j``.
        iterations: number of routing iterations ``r >= 1``; ``1`` is uniform coupling ``1/J``.
        detach: if True the coupling coefficients are constants in backpropagation: the
            iterations run on ``u_hat.detach()`` and gradients reach ``u_hat`` only through the
            final weighted sum ``s_j = sum_i c_ij u_hat_j|i``. If False, gradients flow through
            every iteration.
        logit_scale: lambda, multiplying each agreement update ``b_ij += lambda u_hat_j|i . v_j``.
            1 is the paper. At capsexp's geometry (hundreds of input capsules, small votes) the
            agreements are 1e-3 to 1e-2, so with lambda = 1 the couplings stay within 3e-4 nats of
            uniform; a larger lambda lets routing make decisions at all.
        return_couplings: also return the coupling coefficients of every iteration.

    Returns:
        ``v`` of shape ``[B, J, D]``, and with ``return_couplings`` a detached tensor of the
        couplings ``[iterations, B, I, J]`` (entry ``k`` is the ``c`` used in iteration ``k+1``).
        Half and bfloat16 inputs are routed in float32 (autocast is switched off inside) and
        the outputs stay float32, so callers get stable lengths under mixed precision.

    The routing logits ``b`` start at zero on every call: nothing is kept between calls.
    """
    s, couplings = dynamic_routing_sum(u_hat, iterations, detach, logit_scale, return_couplings)
    v = squash(s)
    if return_couplings:
        return v, couplings
    return v


def dynamic_routing_sum(u_hat: Tensor, iterations: int, detach: bool = False, logit_scale: float = 1.0,
                        return_couplings: bool = True) -> tuple[Tensor, Tensor]:
    """``dynamic_routing`` up to its last weighted sum: ``(s, couplings)``, with ``v = squash(s)``.

    The capsule head calls this and squashes ``s`` itself, so that the gradient at ``s`` (the
    squash's input, a hop of the gradient ladder) is a tensor it can watch. Arguments and the
    couplings ``[iterations, B, I, J]`` (detached; an empty tensor without ``return_couplings``,
    which with a thousand classes at 224 px would be gigabytes) are those of ``dynamic_routing``.
    """
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1; got {iterations!r}")
    if u_hat.dim() != 4:
        raise ValueError(f"u_hat must have shape [B, I, J, D]; got {tuple(u_hat.shape)}")

    with torch.autocast(device_type=u_hat.device.type, enabled=False):
        u_hat = u_hat.to(_routing_dtype(u_hat.dtype))
        # With detach the agreement updates see no graph, so c is a constant for autograd.
        u_route = u_hat.detach() if detach else u_hat
        batch, inputs, outputs, _ = u_hat.shape
        logits = u_hat.new_zeros(batch, inputs, outputs)
        couplings: list[Tensor] = []
        for step in range(iterations):
            c = torch.softmax(logits, dim=-1)  # over the output capsules J
            if return_couplings:
                couplings.append(c.detach())
            if step == iterations - 1:
                break
            v = squash(torch.einsum("bij,bijd->bjd", c, u_route))
            logits = logits + logit_scale * torch.einsum("bijd,bjd->bij", u_route, v)
        # The final sum always uses the real u_hat: identical to u_route without detach.
        s = torch.einsum("bij,bijd->bjd", c, u_hat)
    return s, torch.stack(couplings) if couplings else u_hat.new_empty(0)


def _check_iterations(iterations: object) -> int:
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1; got {iterations!r}")
    return iterations


def _common_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype the tensors are routed in: their promoted dtype, float32 for half precision."""
    dtype = tensors[0].dtype
    for tensor in tensors[1:]:
        dtype = torch.promote_types(dtype, tensor.dtype)
    if not dtype.is_floating_point:
        raise ValueError(f"routing needs floating-point tensors; got {dtype}")
    return _routing_dtype(dtype)


@overload
def attention_routing(u_hat: Tensor, iterations: int, norm: Callable[[Tensor], Tensor] | None = ...,
                      return_couplings: Literal[False] = ...) -> Tensor: ...
@overload
def attention_routing(u_hat: Tensor, iterations: int, norm: Callable[[Tensor], Tensor] | None = ..., *,
                      return_couplings: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def attention_routing(u_hat: Tensor, iterations: int, norm: Callable[[Tensor], Tensor] | None = ...,
                      return_couplings: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def attention_routing(
    u_hat: Tensor,
    iterations: int,
    norm: Callable[[Tensor], Tensor] | None = None,
    return_couplings: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Inverted dot-product attention routing (Tsai et al., ICLR 2020, Procedure 1).

    The output capsules are the queries and the votes the keys and values, but the softmax
    runs over the outputs ``J`` for each input ``i`` (hence "inverted"): outputs compete for
    the inputs, as in routing by agreement.

    * iteration 1: uniform couplings ``c_ij = 1/J`` (the paper starts from ``v = 0``, whose
      agreements are all zero), ``v_j = norm(sum_i c_ij u_hat_j|i)``;
    * each further iteration: ``c_ij = softmax_j(u_hat_j|i . v_j / sqrt(D))`` with ``v`` from
      the previous iteration, then ``v_j = norm(sum_i c_ij u_hat_j|i)``.

    Args:
        u_hat: votes ``[B, I, J, D]``.
        iterations: number of routing iterations ``r >= 1``; ``1`` is uniform coupling.
        norm: applied to the weighted sums ``[B, J, D]`` after every iteration (a head passes
            its ``nn.LayerNorm(D)``). ``None`` is a layer norm over the last axis without
            affine parameters, ``F.layer_norm(s, (D,))``.
        return_couplings: also return the couplings of every iteration.

    Returns:
        ``v`` of shape ``[B, J, D]``, and with ``return_couplings`` a detached tensor
        ``[iterations, B, I, J]`` whose entry ``k`` is the ``c`` of iteration ``k+1``'s sum.
        Gradients flow through every iteration.

    Where it differs from ``CapsuleFC`` (apple/ml-capsules-inverted-attention-routing) and why:
    docs/capsule-head.md. For ``D == 1`` pass ``norm=lambda s: s`` (a layer norm maps it to 0).
    """
    iterations = _check_iterations(iterations)
    if u_hat.dim() != 4 or min(u_hat.shape[1:]) < 1:
        raise ValueError(
            f"u_hat must have shape [B, I, J, D] with I, J, D >= 1; got {tuple(u_hat.shape)}"
        )

    with torch.autocast(device_type=u_hat.device.type, enabled=False):
        u_hat = u_hat.to(_common_dtype(u_hat))
        batch, inputs, outputs, dim = u_hat.shape
        normalise = norm if norm is not None else (lambda s: F.layer_norm(s, (dim,)))
        scale = 1.0 / math.sqrt(dim)
        c = u_hat.new_full((batch, inputs, outputs), 1.0 / outputs)
        couplings: list[Tensor] = []
        v: Tensor
        for step in range(iterations):
            if step > 0:
                agreement = torch.einsum("bijd,bjd->bij", u_hat, v) * scale
                c = torch.softmax(agreement, dim=-1)  # over the output capsules J
            if return_couplings:
                couplings.append(c.detach())
            v = normalise(torch.einsum("bij,bijd->bjd", c, u_hat))

    if return_couplings:
        return v, torch.stack(couplings)
    return v


@overload
def self_routing(pose: Tensor, a: Tensor, weight: Tensor, bias: Tensor,
                 return_couplings: Literal[False] = ...) -> Tensor: ...
@overload
def self_routing(pose: Tensor, a: Tensor, weight: Tensor, bias: Tensor,
                 return_couplings: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def self_routing(pose: Tensor, a: Tensor, weight: Tensor, bias: Tensor,
                 return_couplings: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def self_routing(
    pose: Tensor,
    a: Tensor,
    weight: Tensor,
    bias: Tensor,
    return_couplings: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Output activations of self-routing (Hahn et al., NeurIPS 2019, eqs. 2 and 3).

    Each input capsule routes itself with its own routing weights, without looking at the
    other capsules, so there are no iterations:

    * ``logits_ij = W^r_i u_i + b^r_i``, i.e. ``sum_c weight[i, j, c] pose[b, i, c] + bias[i, j]``;
    * ``c_ij = softmax_j(logits_ij)``;
    * ``a_j = sum_i a_i c_ij / sum_i a_i``: the share of the total input activation routed to
      ``j``. Since every ``c_i`` sums to one, the ``a_j`` of one example sum to one over ``J``.

    Args:
        pose: input capsules ``[B, I, C]``.
        a: input activations ``[B, I]``, expected in ``(0, 1)`` (non-negative at least).
        weight: routing weights ``[I, J, C]``.
        bias: routing biases ``[I, J]``.
        return_couplings: also return the couplings.

    Returns:
        ``a_out`` of shape ``[B, J]``, and with ``return_couplings`` the detached couplings as
        ``[1, B, I, J]`` (one "iteration", the layout of the iterative routings).

    Differences from the reference implementation (``SelfRouting2d`` of coder3000/SR-CapsNet):
    the votes are computed outside (the pose output ``sum_i a_i c_ij u_hat_j|i / sum_i a_i
    c_ij`` is not part of this function), the layer is fully connected rather than a
    convolution over unfolded patches, and the denominator ``sum_i a_i`` is clamped at the
    smallest normal number, so an example with no active input gets ``a_out = 0`` rather than
    NaN (the reference divides unguarded).
    """
    if pose.dim() != 3 or min(pose.shape[1:]) < 1:
        raise ValueError(f"pose must have shape [B, I, C] with I, C >= 1; got {tuple(pose.shape)}")
    batch, inputs, channels = pose.shape
    if tuple(a.shape) != (batch, inputs):
        raise ValueError(f"a must have shape [B, I] = {(batch, inputs)}; got {tuple(a.shape)}")
    if weight.dim() != 3 or weight.shape[0] != inputs or weight.shape[2] != channels or weight.shape[1] < 1:
        raise ValueError(
            f"weight must have shape [I, J, C] with I = {inputs}, C = {channels}, J >= 1; "
            f"got {tuple(weight.shape)}"
        )
    outputs = weight.shape[1]
    if tuple(bias.shape) != (inputs, outputs):
        raise ValueError(f"bias must have shape [I, J] = {(inputs, outputs)}; got {tuple(bias.shape)}")

    with torch.autocast(device_type=pose.device.type, enabled=False):
        dtype = _common_dtype(pose, a, weight, bias)
        pose, a, weight, bias = pose.to(dtype), a.to(dtype), weight.to(dtype), bias.to(dtype)
        logits = torch.einsum("ijc,bic->bij", weight, pose) + bias
        c = torch.softmax(logits, dim=-1)  # over the output capsules J
        total = a.sum(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
        a_out = torch.einsum("bi,bij->bj", a, c) / total

    if return_couplings:
        return a_out, c.detach().unsqueeze(0)
    return a_out


def _check_em(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, final_lambda: float) -> None:
    if (
        isinstance(final_lambda, bool)
        or not isinstance(final_lambda, (int, float))
        or not math.isfinite(final_lambda)
        or final_lambda <= 0
    ):
        raise ValueError(f"final_lambda must be a finite number > 0; got {final_lambda!r}")
    if votes.dim() != 4 or min(votes.shape[1:]) < 1:
        raise ValueError(
            f"votes must have shape [B, I, J, P] with I, J, P >= 1; got {tuple(votes.shape)}"
        )
    batch, inputs, outputs, _ = votes.shape
    if tuple(a_in.shape) != (batch, inputs):
        raise ValueError(f"a_in must have shape [B, I] = {(batch, inputs)}; got {tuple(a_in.shape)}")
    for name, beta in (("beta_u", beta_u), ("beta_a", beta_a)):
        if tuple(beta.shape) != (outputs,):
            raise ValueError(f"{name} must have shape [J] = [{outputs}]; got {tuple(beta.shape)}")


def _m_step(r: Tensor, a_in: Tensor, votes: Tensor, beta_u: Tensor, beta_a: Tensor,
            inverse_temperature: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EM routing's M-step: ``(mu [B, J, P], V - mu [B, I, J, P], sigma^2 [B, J, P], the activation
    logit [B, J])`` from the assignments ``r`` ``[B, I, J]``:

    ``R_ij <- R_ij a_i``; ``mu_jh = sum_i R_ij V_ijh / sum_i R_ij``;
    ``sigma^2_jh = sum_i R_ij (V_ijh - mu_jh)^2 / sum_i R_ij + eps``;
    ``cost_jh = (beta_u_j + log sigma_jh) sum_i R_ij``; logit ``lambda_t (beta_a_j - sum_h cost_jh)``,
    whose sigmoid is ``a_j``.
    """
    weighted = r * a_in.unsqueeze(-1)  # [B, I, J]
    mass = weighted.sum(dim=1)  # [B, J]
    share = weighted / mass.clamp_min(torch.finfo(r.dtype).tiny).unsqueeze(1)  # [B, I, J]
    mu = torch.einsum("bij,bijp->bjp", share, votes)
    deviation = votes - mu.unsqueeze(1)  # [B, I, J, P]
    variance = torch.einsum("bij,bijp->bjp", share, deviation.pow(2)) + EM_VARIANCE_EPS
    cost = (beta_u.unsqueeze(-1) + 0.5 * torch.log(variance)) * mass.unsqueeze(-1)  # [B, J, P]
    return mu, deviation, variance, inverse_temperature * (beta_a - cost.sum(dim=-1))


def _e_step(logit: Tensor, deviation: Tensor, variance: Tensor, log_variance: Tensor) -> Tensor:
    """EM routing's E-step: ``R_ij = softmax_j(log a_j + log p_ij)`` with
    ``log p_ij = sum_h log N(V_ijh; mu_jh, sigma^2_jh)``, i.e. ``R_ij = a_j p_ij / sum_k a_k p_ik``
    in the log domain, so densities that under- or overflow do not give NaN."""
    log_p = -0.5 * (
        math.log(2.0 * math.pi) + log_variance.unsqueeze(1) + deviation.pow(2) / variance.unsqueeze(1)
    ).sum(dim=-1)  # [B, I, J]
    return torch.softmax(F.logsigmoid(logit).unsqueeze(1) + log_p, dim=-1)  # over J


@overload
def em_routing(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
               final_lambda: float = ..., return_couplings: Literal[False] = ...) -> tuple[Tensor, Tensor]: ...
@overload
def em_routing(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
               final_lambda: float = ..., *, return_couplings: Literal[True]) -> tuple[Tensor, Tensor, Tensor]: ...
@overload
def em_routing(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
               final_lambda: float = ..., return_couplings: bool = ...
               ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]: ...
def em_routing(votes: Tensor, a_in: Tensor, beta_u: Tensor, beta_a: Tensor, iterations: int,
               final_lambda: float = 0.01, return_couplings: bool = False
               ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """EM routing of matrix capsules (Hinton et al., ICLR 2018, Procedure 1).

    Each output capsule is a diagonal Gaussian over the ``P`` vote entries; routing fits a
    mixture of them to the votes weighted by the input activations. ``R_ij`` starts at
    ``1/J``; iteration ``t = 1..iterations`` runs an M-step (``_m_step``) at inverse
    temperature ``lambda_t = final_lambda * (1 - 0.95^t)``, then, except after the last
    M-step, an E-step (``_e_step``).

    Args:
        votes: ``V`` of shape ``[B, I, J, P]`` (``P = 16`` for 4x4 pose matrices).
        a_in: input activations ``[B, I]`` in ``(0, 1)``.
        beta_u: ``[J]``, the cost of explaining a vote entry by output ``j`` (per unit of
            ``sum_i R_ij``), shared over the ``P`` entries.
        beta_a: ``[J]``, the cost of activating output ``j``.
        iterations: number of M-steps ``>= 1``.
        final_lambda: the inverse temperature the schedule approaches, ``> 0``.
        return_couplings: also return the assignment probabilities of every iteration.

    Returns:
        ``(pose, a_out)`` with ``pose = mu`` of shape ``[B, J, P]`` and ``a_out`` ``[B, J]``;
        with ``return_couplings`` also a detached tensor ``[iterations, B, I, J]`` whose entry
        ``k`` is the ``R`` the M-step of iteration ``k+1`` starts from (before the ``a_i``
        weighting, so each row sums to one over ``J``). Gradients flow through every step.

    ``eps`` is ``EM_VARIANCE_EPS`` (1e-8), added to every variance. The schedule ``lambda_t``
    is the one the authors gave on OpenReview (the paper only says that ``lambda`` grows).

    Where it differs from ``EmRouting2d`` (coder3000/SR-CapsNet) and why: docs/capsule-head.md.
    """
    iterations = _check_iterations(iterations)
    _check_em(votes, a_in, beta_u, beta_a, final_lambda)
    batch, inputs, outputs, _ = votes.shape
    with torch.autocast(device_type=votes.device.type, enabled=False):
        dtype = _common_dtype(votes, a_in, beta_u, beta_a)
        votes, a_in = votes.to(dtype), a_in.to(dtype)
        beta_u, beta_a = beta_u.to(dtype), beta_a.to(dtype)
        r = votes.new_full((batch, inputs, outputs), 1.0 / outputs)
        couplings: list[Tensor] = []
        for step in range(1, iterations + 1):
            if return_couplings:
                couplings.append(r.detach())
            inverse_temperature = final_lambda * (1.0 - EM_LAMBDA_DECAY**step)

            mu, deviation, variance, logit = _m_step(r, a_in, votes, beta_u, beta_a, inverse_temperature)
            log_variance = torch.log(variance)
            a_out = torch.sigmoid(logit)
            if step == iterations:
                break

            r = _e_step(logit, deviation, variance, log_variance)

    if return_couplings:
        return mu, a_out, torch.stack(couplings)
    return mu, a_out
