"""Synthetic weights and Hessians for the conformance kit: pure functions, seeded, CPU, float32.

Real LLM weights are roughly Gaussian with a few large outliers, so the kit checks both a Gaussian and a
heavy-tailed (Student-t, 3 degrees of freedom) weight. Everything is drawn from an explicit
``torch.Generator`` so a failure reproduces exactly from the seed in its message.
"""

from __future__ import annotations

import torch


def round_up(n: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is ``>= n`` (and at least ``multiple``)."""
    return max(multiple, -(-n // multiple) * multiple)


def fit_shape(shape: tuple[int, int], out_multiple: int, in_multiple: int) -> tuple[int, int]:
    """``(out, in)`` rounded up so that it meets a quantizer's shape constraints."""
    return round_up(shape[0], out_multiple), round_up(shape[1], in_multiple)


def gaussian_weight(shape: tuple[int, int], seed: int, std: float = 0.02) -> torch.Tensor:
    """``[out, in]`` float32 weight with i.i.d. N(0, std^2) entries (std 0.02: typical of LLM layers)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * std


def student_t_weight(shape: tuple[int, int], seed: int, std: float = 0.02, dof: int = 3) -> torch.Tensor:
    """``[out, in]`` float32 weight with Student-t(``dof``) entries times ``std``: heavy tails, outliers.

    Drawn as ``z / sqrt(chi2_dof / dof)`` from one generator (torch.distributions takes no generator).
    """
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64)  # (out, in)
    chi2 = torch.randn((*shape, dof), generator=g, dtype=torch.float64).square().sum(-1)  # (out, in)
    return (z / (chi2 / dof).sqrt() * std).to(torch.float32)


def synthetic_hessian(in_features: int, seed: int, samples_per_feature: int = 4) -> torch.Tensor:
    """``[in, in]`` float32 SPD ``X^T X / n`` of correlated random activations ``X`` ``[n, in]``.

    Correlated (``X = Z M`` with a random mixing ``M``) so that Hessian-aware quantizers see a
    non-diagonal matrix, as with real calibration data; ``n = samples_per_feature * in`` keeps it full rank,
    and a small ridge keeps it safely positive definite.
    """
    g = torch.Generator().manual_seed(seed)
    n = samples_per_feature * in_features
    z = torch.randn(n, in_features, generator=g, dtype=torch.float64)  # (n, in)
    mix = torch.eye(in_features, dtype=torch.float64)
    mix += 0.5 * torch.randn(in_features, in_features, generator=g, dtype=torch.float64) / in_features**0.5
    x = z @ mix  # (n, in)
    h = x.T @ x / n  # (in, in)
    h += 1e-3 * h.diagonal().mean() * torch.eye(in_features, dtype=torch.float64)
    return h.to(torch.float32)


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||W - Q||_F / ||W||_F``, computed in float64."""
    w = weight.to(torch.float64)
    return float((w - approx.to(torch.float64)).norm() / w.norm().clamp_min(1e-300))
