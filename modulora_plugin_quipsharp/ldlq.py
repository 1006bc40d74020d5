"""BlockLDLQ: quantize 8-column blocks in order, feeding each block's error forward through the Hessian's LDL.

With the Hessian written as ``H = (I + U) D (I + U)^T``, ``U`` strictly block-upper-triangular (8x8 blocks)
and ``D`` block-diagonal, the blocks are quantized as ``What_k = Q(W_k + (W_<k - What_<k) U_<k,k)``. Then
``(What - W)(I + U) = eta`` (the rounding noise of each call of ``Q``), so the proxy loss
``tr((What - W) H (What - W)^T)`` is ``sum_k eta_k D_k eta_k^T``: GPTQ's error feedback, blockwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from modulora_core import InvalidWeightError

BLOCK = 8  # the codebook dimension
LAZY_COLUMNS = 128  # feedback into later columns is applied in batches of this many (one GEMM per batch)
SCALE_SEARCH_ROWS = 128  # rows of the weight on which the candidate scales are compared


def damp_hessian(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64 (a new tensor)."""
    h = h.to(torch.float64)
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise InvalidWeightError(f"the Hessian's mean diagonal is {mean_diag:g}: no calibration signal reached "
                                 "this layer; it must be X^T X of real inputs (positive on the diagonal)")
    return h + damp * mean_diag * torch.eye(h.shape[0], dtype=torch.float64, device=h.device)


def block_ldl(h: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """``[n, n]`` SPD -> ``U`` ``[n, n]`` float64, strictly block-upper, with ``H = (I + U) D (I + U)^T``.

    Via the Cholesky factor of the reversed matrix: ``J H J = C C^T`` gives ``J H J = L D' L^T`` with
    ``L = C blockdiag(C)^-1`` unit block-lower, and ``I + U = J L J``.
    """
    n = h.shape[0]
    if n % block:
        raise InvalidWeightError(f"BlockLDLQ needs in_features divisible by {block}, got {n}")
    c, info = torch.linalg.cholesky_ex(torch.flip(h.to(torch.float64), (0, 1)))
    if int(info):
        raise InvalidWeightError(
            "the Hessian is not positive definite after dampening (Cholesky failed at column "
            f"{int(info)} of {n}); pass X^T X of more calibration tokens than in_features, or raise `damp`"
        )
    nb = n // block
    diag = c.view(nb, block, nb, block).diagonal(dim1=0, dim2=2).permute(2, 0, 1)  # (nb, 8, 8) lower
    inv = torch.linalg.solve_triangular(diag, torch.eye(block, dtype=c.dtype, device=c.device).expand(nb, block, block),
                                        upper=False)
    lower = torch.einsum("ikj,kjl->ikl", c.view(n, nb, block), inv).reshape(n, n)  # (n, n) unit block-lower
    u = torch.flip(lower, (0, 1))
    for k in range(nb):  # the diagonal blocks are the identity: U is the strictly upper part
        u[k * block:(k + 1) * block, k * block:(k + 1) * block] = 0
    return u


def block_ldlq(w: torch.Tensor, u: torch.Tensor | None,
               quantize_block: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Quantize ``w`` ``[m, n]`` block by block with error feedback through ``u`` (None: plain rounding).

    ``quantize_block([m, 8]) -> [m, 8]`` returns the reconstruction of one block of columns (and may record
    its codes). Returns the quantized ``[m, n]`` float32 reconstruction.
    """
    m, n = w.shape
    w = w.to(torch.float32)
    if u is None:
        return torch.cat([quantize_block(w[:, a:a + BLOCK]) for a in range(0, n, BLOCK)], dim=1)
    u = u.to(torch.float32)
    target = w.clone()  # W plus the feedback received so far, (m, n)
    q = torch.empty_like(w)
    for g0 in range(0, n, LAZY_COLUMNS):
        g1 = min(g0 + LAZY_COLUMNS, n)
        for a in range(g0, g1, BLOCK):
            b = a + BLOCK
            if a > g0:  # feedback from the earlier blocks of this batch
                target[:, a:b] += (w[:, g0:a] - q[:, g0:a]) @ u[g0:a, a:b]
            q[:, a:b] = quantize_block(target[:, a:b])
        if g1 < n:  # feedback from this batch into every later column at once
            target[:, g1:] += (w[:, g0:g1] - q[:, g0:g1]) @ u[g0:g1, g1:]
    return q


def pick_scale(w: torch.Tensor, h: torch.Tensor, u: torch.Tensor, scales: Sequence[float],
               quantize_block: Callable[[torch.Tensor], torch.Tensor], rows: int = SCALE_SEARCH_ROWS) -> int:
    """Index of the scale in ``scales`` whose BlockLDLQ of ``w`` ``[m, n]`` has the lowest proxy loss
    ``tr(E H E^T)`` (``h`` ``[n, n]``, ``u`` its :func:`block_ldl`), judged on the first ``rows`` rows.

    BlockLDLQ treats rows independently, so the candidates run as one stacked pass (one encoder call per
    column block for all of them), and a subset of rows estimates the loss of the whole.
    """
    sub = w[:rows].to(torch.float64)  # (k, n)
    k = sub.shape[0]
    q = block_ldlq(torch.cat([sub / s for s in scales]).to(torch.float32), u, quantize_block)  # (len * k, n)
    h = h.to(torch.float64)
    losses = []
    for i, s in enumerate(scales):
        e = q[i * k:(i + 1) * k].to(torch.float64) * s - sub  # (k, n)
        losses.append(float(((e @ h) * e).sum()))
    return min(range(len(scales)), key=losses.__getitem__)
