"""Representation drift: linear CKA between what a stage computes now and what it computed at the start.

Pure functions of activations and Gram matrices (Kornblith et al. 2019, "Similarity of Neural
Network Representations Revisited"). A run keeps only the ``N x N`` centred Gram matrix of each
stage's output on a fixed probe set under its starting weights, never the activations.
"""

from __future__ import annotations

import torch
from torch import Tensor


def centred_gram(features: Tensor) -> Tensor:
    """``H K H`` for ``K = X X^T``: features ``[N, ...]`` flattened to ``[N, D]``, in float64.

    Centring the Gram matrix equals centring each feature over the N examples first
    (``H X (H X)^T``), which is what linear CKA needs; float64 because the Frobenius products
    of large Gram matrices lose digits in float32.
    """
    x = features.detach().flatten(1).double()
    x = x - x.mean(dim=0, keepdim=True)
    return x @ x.T


def linear_cka(k: Tensor, l: Tensor) -> float:
    """Linear CKA from two centred Gram matrices: ``<K, L>_F / (||K||_F ||L||_F)``.

    This is ``HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L))``; the ``1/(n-1)^2`` factors of HSIC
    cancel. 1.0 for the same representation (up to an orthogonal transform and an isotropic
    scale), near 0 for unrelated ones; nan when either representation is constant.
    """
    denominator = torch.linalg.matrix_norm(k) * torch.linalg.matrix_norm(l)
    if not float(denominator) > 0:
        return float("nan")
    return float((k * l).sum() / denominator)
