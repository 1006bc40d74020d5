"""The OPTQ / GPTQ algorithm (Frantar et al., ICLR 2023) on one ``[out, in]`` weight: pure tensors in and out.

Columns are quantized one at a time (in Hessian-diagonal order with act-order, or group by group in
group-aware order, see :func:`group_aware_order`); each column's rounding
error is spread over the columns not yet quantized through the upper Cholesky factor ``U`` of ``H^-1``
(``H = X^T X`` plus dampening). Columns go in blocks of ``block_size``: inside a block the feedback is
applied column by column, to the rest of the weight once per block (the "lazy batch" update), which keeps
the work in matrix products. A group's scale and zero are fixed when its first column comes up, from the
weights as updated by then (or, with ``static_groups``, from the original weights before any update).
Scales are rounded to float16 before use, so the error fed back is the error of the stored weight.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from modulora_core import InvalidWeightError

FP16_TINY = 2.0**-24  # the smallest positive float16: a scale never rounds to zero


@dataclass
class GPTQResult:
    """Integer codes ``[out, in]`` (original column order), per-group ``scales`` ``[G, out]`` float16,
    ``zeros`` ``[G, out]`` (the zero point itself, 0..2^bits-1) and ``g_idx`` ``[in]`` int32."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor


def group_params(w: torch.Tensor, bits: int, sym: bool, mse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float16-representable, as float32) and integer zero ``[out]`` of columns ``w`` ``[out, k]``.

    Min-max: the range always contains 0; symmetric puts the zero at ``2^(bits-1)``, as GPTQ's v1 checkpoints
    do. With ``mse > 0`` (a norm exponent, 2.4 in GPTQ's code) each row's range is also shrunk by factors
    1, 0.99, ..., 0.21 and the one whose rounding error ``sum |w - q|^mse`` is smallest is kept: clipping a
    few outliers buys a finer grid for the rest.
    """
    maxq = (1 << bits) - 1
    lo = w.amin(dim=1).clamp(max=0)
    hi = w.amax(dim=1).clamp(min=0)
    if sym:
        hi = torch.maximum(-lo, hi)
        lo = torch.where(lo < 0, -hi, lo)
    both_zero = (lo == 0) & (hi == 0)
    lo = torch.where(both_zero, -1.0, lo)
    hi = torch.where(both_zero, 1.0, hi)
    scale = ((hi - lo) / maxq).half()
    if not bool(torch.isfinite(scale).all()):
        raise InvalidWeightError(f"optq: weight values up to {float(w.abs().max()):.3g} need a scale beyond "
                                 "float16's range (65504), which the GPTQ format stores; rescale the weight")
    if mse > 0:
        shrink = 1 - torch.arange(_CLIP_STEPS, device=w.device, dtype=w.dtype) / 100  # (C,)
        lo, hi = shrink[:, None] * lo, shrink[:, None] * hi  # (C, out)
    scale = ((hi - lo) / maxq).half().float().clamp(min=FP16_TINY)
    if sym:
        zero = torch.full_like(scale, float((maxq + 1) // 2))
    else:
        zero = torch.round(-lo / scale).clamp(0, maxq)
    if mse > 0:  # pick each row's best shrink factor
        step = max(1, _CLIP_CHUNK // max(1, w.numel()))  # candidates per pass: bounded memory for whole rows
        err = torch.cat([_clip_error(w, scale[c:c + step], zero[c:c + step], maxq, mse)
                         for c in range(0, _CLIP_STEPS, step)])  # (C, out)
        best = err.argmin(0, keepdim=True)  # (1, out): the first (largest range) among equals
        scale, zero = scale.gather(0, best)[0], zero.gather(0, best)[0]
    return scale, zero


_CLIP_STEPS = 80  # shrink factors tried by the clipping search: down to 0.21 of the min-max range
_CLIP_CHUNK = 1 << 24  # elements of the [candidates, out, k] error tensor per pass


def _clip_error(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int, mse: float) -> torch.Tensor:
    """``sum_k |w - q|^mse`` ``[C, out]`` of ``w`` ``[out, k]`` rounded with each candidate ``[C, out]``."""
    s3, z3 = scale[..., None], zero[..., None]  # (C, out, 1)
    return (s3 * (torch.clamp(torch.round(w / s3) + z3, 0, maxq) - z3) - w).abs_().pow_(mse).sum(-1)


def inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``(H + damp * mean(diag H) * I)^-1`` (so ``U^T U = H^-1``), ``[in, in]``.

    With ``J`` the order reversal and ``J H J = L L^T``: ``U = J L^-1 J`` (upper triangular, positive
    diagonal, and ``U^T U = J L^-T L^-1 J = H^-1``), one factorization and one triangular inverse instead
    of factorizing, inverting and factorizing again. Tried in float32 (what GPTQ uses), then in float64, then
    with the dampening doubled until it would reach 100% (with a warning; GPTQModel too raises its dampening
    until the factorization succeeds); a matrix that fails all is not positive definite, which only a broken
    Hessian is.
    """
    damps = [damp_percent]
    while damps[-1] * 2 < 1:
        damps.append(damps[-1] * 2)
    mean = h.diagonal().mean()
    for k, pct in enumerate(damps):
        for dtype in (torch.float32, torch.float64):
            hd = h.to(dtype).flip(0, 1)  # J H J
            hd.diagonal().add_((pct * mean).to(dtype))
            chol, info = torch.linalg.cholesky_ex(hd)
            if int(info) == 0:
                eye = torch.eye(h.shape[0], dtype=dtype, device=h.device)
                u = torch.linalg.solve_triangular(chol, eye, upper=False).flip(0, 1)
                if bool(torch.isfinite(u).all()):
                    if k:
                        warnings.warn(f"optq: the Hessian needed dampening {pct:g} instead of damp_percent="
                                      f"{damp_percent:g} to be positive definite", stacklevel=3)
                    return u.to(torch.float32)
    raise InvalidWeightError(
        f"optq: the Hessian is not positive definite even with dampening raised from damp_percent={damp_percent} "
        f"to {damps[-1]:g}; check that the calibration inputs are finite and not all zero"
    )


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware reordering (GAR, Gafni et al. 2025): the column order ``perm`` ``[in]`` (position -> column).

    Whole groups go by descending importance (their largest Hessian diagonal entry), and inside each group the
    columns by descending diagonal: GPTQ quantizes the important columns first, while their error can still be
    absorbed by the rest, yet every group keeps its columns, so ``g_idx`` stays ``i // group_size`` and the
    checkpoint is an ordinary act-order-off one. A ragged last group stays last, in its own order.
    """
    n = diag.shape[0]
    full = n // group_size
    d = diag[: full * group_size].view(full, group_size)
    vals, local = torch.sort(d, dim=1, descending=True, stable=True)  # (G, gs)
    order = torch.argsort(vals[:, 0], descending=True, stable=True)  # (G,)
    base = torch.arange(full, device=diag.device).unsqueeze(1) * group_size
    perm = (local + base)[order].reshape(-1)
    return torch.cat([perm, torch.arange(full * group_size, n, device=diag.device)])


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, *, bits: int, group_size: int, sym: bool,
                  desc_act: bool, static_groups: bool, damp_percent: float, block_size: int,
                  act_group_aware: bool = False, mse: float = 0.0) -> GPTQResult:
    """GPTQ-quantize ``weight`` ``[out, in]`` against ``hessian`` ``[in, in]``; inputs are not modified.

    ``act_group_aware`` (group-aware order) applies only with act-order off and groups (``group_size > 0``).
    """
    out_f, in_f = weight.shape
    maxq = (1 << bits) - 1
    dev = weight.device  # every tensor below lives here: a CUDA weight is quantized on its GPU
    w = weight.detach().to(torch.float32).clone()  # (out, in)
    h = hessian.detach().to(device=dev, dtype=torch.float32).clone()  # (in, in)
    dead = h.diagonal() == 0  # inputs the calibration never excited: any value is free, zero is cheapest
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = group_size if group_size > 0 else in_f
    n_groups = -(-in_f // gs)

    static: tuple[torch.Tensor, torch.Tensor] | None = None
    if static_groups or group_size <= 0:  # fixed up front, from the original column order
        params = [group_params(w[:, g * gs:(g + 1) * gs], bits, sym, mse) for g in range(n_groups)]
        static = (torch.stack([p[0] for p in params]), torch.stack([p[1] for p in params]))  # (G, out) x2

    gar = act_group_aware and not desc_act and group_size > 0
    perm = None
    if desc_act:
        perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    elif gar:
        perm = group_aware_order(h.diagonal(), gs)
    if perm is not None:
        w, h = w[:, perm], h[perm][:, perm]
    u = inverse_cholesky(h, damp_percent)  # (in, in)
    del h

    # column position -> its group, in the processing order
    cols = torch.arange(in_f, device=dev)
    orig_col = perm if perm is not None else cols
    col_group = orig_col // gs if static is not None else cols // gs
    # a dynamic group's slot in scales/zeros: act-order's groups are runs of the processing order; GAR's are
    # the original groups, each processed whole (a Python list: no device sync per group)
    dyn_slot = (orig_col // gs if gar else cols // gs).tolist()
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=dev)
    scales = torch.empty(n_groups, out_f, device=dev)
    zeros = torch.empty(n_groups, out_f, device=dev)
    if static is not None:
        scales.copy_(static[0])
        zeros.copy_(static[1])
    # groups never straddle a block, so a dynamic group's parameters see every update before it
    bs = block_size if group_size <= 0 or static is not None else max(gs, block_size // gs * gs)
    col_scale = scales.T[:, col_group] if static is not None else None  # (out, in) when fixed
    col_zero = zeros.T[:, col_group] if static is not None else None
    # inside a block, rank-1 updates reach only the next few columns (a sub-block that divides every group
    # size); each finished sub-block updates the rest of its block in one product: same result, less work
    sub = min(32, gs) if static is None else 32
    for i1 in range(0, in_f, bs):
        i2 = min(i1 + bs, in_f)
        w1 = w[:, i1:i2].clone()  # (out, B)
        err1 = torch.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for j1 in range(0, i2 - i1, sub):
            j2 = min(j1 + sub, i2 - i1)
            for i in range(j1, j2):
                col = i1 + i
                if static is None:
                    if col % gs == 0:
                        s, z = group_params(w1[:, i: i + gs], bits, sym, mse)
                        scales[dyn_slot[col]], zeros[dyn_slot[col]] = s, z
                else:
                    s, z = col_scale[:, col], col_zero[:, col]
                x = w1[:, i]
                q = torch.clamp(torch.round(x / s) + z, 0, maxq)
                codes[:, col] = q.to(torch.uint8)
                e = (x - s * (q - z)) / u1[i, i]
                err1[:, i] = e
                w1[:, i:j2].addr_(e, u1[i, i:j2], alpha=-1.0)  # feed the error forward in the sub-block
            w1[:, j2:].addmm_(err1[:, j1:j2], u1[j1:j2, j2:], alpha=-1.0)  # the rest of the block
        w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1.0)  # and, once per block, everything after it

    if desc_act and static is None:
        g_idx = torch.empty(in_f, dtype=torch.int32, device=dev)
        g_idx[perm] = (cols // gs).to(torch.int32)  # non-monotonic: groups of the order
    else:
        g_idx = (cols // gs).to(torch.int32)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
    return GPTQResult(codes.contiguous(), scales.half(), zeros.to(torch.uint8), g_idx)
