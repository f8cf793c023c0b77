"""The capsule mathematics as plain functions: squash, capsule losses and coupling entropy (the routing
algorithms themselves are in ``capsexp.models.routing_algorithms``).

Everything here is stateless so it can be tested against independent formulas and reused by
any head. Shapes follow Sabour et al. 2017 ("Dynamic Routing Between Capsules"):

* ``u_hat``: predictions ``[B, I, J, D]`` (batch, input capsules, output capsules, output dim),
* couplings ``c``: ``[B, I, J]``, a softmax over the output capsules ``J``,
* output capsules ``v``: ``[B, J, D]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Low-precision dtypes that routing upcasts: the softmax over accumulated agreements and the
# squash of sums over thousands of input capsules lose too much in 8-bit mantissas.
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def squash(s: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Squash vectors along ``dim``: ``|s|^2 / (1 + |s|^2) * s / |s|`` (eq. 1 of the paper).

    Short vectors shrink to almost zero length and long ones to just below one; the direction
    is kept. The norm is computed as ``sqrt(sum s^2 + eps)`` rather than ``s.norm()`` because
    the derivative of the norm is undefined at ``s = 0``, which gives NaN gradients for dead
    capsules; with ``eps`` both the output and its gradient are finite (zero) there.
    Half-precision input is squashed in float32 and returned in its own dtype: ``eps`` is below
    float16's smallest subnormal (it would round to 0, giving 0/0 for a zero vector), and the
    squared length of a vector longer than 256 overflows float16.
    """
    x = s.to(_routing_dtype(s.dtype))
    squared = x.pow(2).sum(dim=dim, keepdim=True)
    norm = torch.sqrt(squared + eps)
    return ((squared / (1.0 + squared)) * (x / norm)).to(s.dtype)


def _routing_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


def margin_loss(
    lengths: Tensor,
    targets: Tensor,
    m_plus: float = 0.9,
    m_minus: float = 0.1,
    lambda_: float = 0.5,
) -> Tensor:
    """Margin loss (Sabour et al. 2017, eq. 4), summed over classes and averaged over the batch.

    ``L_k = T_k max(0, m+ - |v_k|)^2 + lambda (1 - T_k) max(0, |v_k| - m-)^2`` where ``T_k`` is
    one for the true class. ``lengths`` are capsule lengths ``[B, C]``; ``targets`` integer
    labels ``[B]``.
    """
    present = F.one_hot(targets.long(), num_classes=lengths.shape[-1]).to(lengths.dtype)
    positive = present * torch.relu(m_plus - lengths).pow(2)
    negative = lambda_ * (1.0 - present) * torch.relu(lengths - m_minus).pow(2)
    return (positive + negative).sum(dim=-1).mean()


def spread_loss(scores: Tensor, targets: Tensor, margin: float) -> Tensor:
    """Spread loss (Hinton et al. 2018): ``sum_{i != t} max(0, m - (a_t - a_i))^2``, batch mean.

    ``scores`` are class activations ``[B, C]``; ``targets`` integer labels ``[B]``.
    """
    targets = targets.long()
    true_score = scores.gather(1, targets[:, None])
    per_class = torch.relu(margin - (true_score - scores)).pow(2)
    # The i = t term would contribute margin^2 regardless of the scores: drop it.
    others = 1.0 - F.one_hot(targets, num_classes=scores.shape[-1]).to(per_class.dtype)
    return (per_class * others).sum(dim=-1).mean()


def coupling_entropy(c: Tensor) -> Tensor:
    """Mean entropy (nats) of couplings ``[..., I, J]`` over the output axis, as a 0-d tensor.

    ``log J`` means uniform coupling (no routing decision); ``0`` means each input capsule
    sends everything to one output capsule. ``0 log 0`` is taken as 0.
    """
    return -torch.special.xlogy(c, c).sum(dim=-1).mean()


def entropy_deficit(c: Tensor, uniform: Tensor) -> Tensor:
    """How far couplings ``[..., I, J]`` are from the ones routing starts from, in nats, as a 0-d tensor:
    the mean over inputs of ``KL(c_i || u_i) = sum_j c_ij log(c_ij / u_ij)``.

    For uniform ``u = 1/J`` this is ``log J - H(c)``, the entropy deficit; computed as a divergence
    (not as a difference of two entropies near ``log J``) so that it is exactly 0 when nothing was
    routed, and keeps its digits when it is 1e-5 of ``log J``.
    """
    return torch.xlogy(c, c / uniform).sum(dim=-1).mean()


def relative_change(output: Tensor, reference: Tensor) -> Tensor:
    """``||output - reference|| / ||reference||`` over all entries, as a 0-d tensor (0 when equal)."""
    return torch.linalg.vector_norm(output - reference) / torch.linalg.vector_norm(reference).clamp_min(1e-30)
