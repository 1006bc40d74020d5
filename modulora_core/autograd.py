"""The quantization-agnostic base path of a LoRA linear: ``y = x W^T`` with W stored packed.

Forward materializes W (whole, or in tiles of ``chunk_rows`` rows), multiplies and frees it; it saves
for backward only a reference to the packed storage - never the dense W and never x. Backward
materializes again and returns ``grad_x = grad_y W``. No gradient reaches the packed storage; LoRA's own
gradients come from PEFT's layers on top (:mod:`modulora_core.peft_lora`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .kernels import SMALL_BATCH
from .native import decodes_on
from .quantizer import PackedWeight, Quantizer


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the base matmul runs in: the autocast dtype when autocast is on, else x's dtype."""
    dev = x.device.type
    if torch.is_autocast_enabled(dev) and x.is_floating_point():
        return torch.get_autocast_dtype(dev)
    return x.dtype


def base_forward(x: torch.Tensor, q: Quantizer, packed: PackedWeight, chunk_rows: int | None,
                 fast: bool) -> torch.Tensor:
    """``[..., in] -> [..., out]`` = ``x @ W^T``, materializing at most ``chunk_rows`` rows of W at once."""
    if fast:
        return q.matmul(x, packed)
    out_f, in_f = packed.shape
    # a decode step multiplies from the packed form if the plugin can, where kernels compile or the CPU kernels
    # run: the eager torch unpack-and-dot takes more passes than materialize + one GEMV (docs/benchmarks.md)
    if x.numel() <= SMALL_BATCH * in_f and decodes_on(x.device):
        y = q.matmul_small(x.reshape(-1, in_f), packed)
        if y is not None:
            return y.reshape(*x.shape[:-1], out_f)
    if chunk_rows is None or chunk_rows >= out_f:
        return F.linear(x, q.materialize(packed, dtype=x.dtype, device=x.device))
    y = x.new_empty(*x.shape[:-1], out_f)
    for a in range(0, out_f, chunk_rows):
        b = min(a + chunk_rows, out_f)
        y[..., a:b] = F.linear(x, q.materialize(packed, dtype=x.dtype, device=x.device, rows=slice(a, b)))
    return y


def base_backward(gy: torch.Tensor, q: Quantizer, packed: PackedWeight, chunk_rows: int | None,
                  fast: bool) -> torch.Tensor:
    """``[..., out] -> [..., in]`` = ``grad_y @ W``, tile by tile when ``chunk_rows`` is set."""
    if fast:
        return q.matmul_T(gy, packed)
    out_f, in_f = packed.shape
    if chunk_rows is None or chunk_rows >= out_f:
        return gy @ q.materialize(packed, dtype=gy.dtype, device=gy.device)
    g2 = gy.reshape(-1, out_f)  # (N, out)
    # the sum over tiles accumulates in float32 for float16/bfloat16: rounding it to 8 or 11 bits after every
    # tile would grow the error with the number of tiles (each tile's own product accumulates in float32)
    low = gy.dtype in (torch.float16, torch.bfloat16)
    gx = g2.new_zeros(g2.shape[0], in_f, dtype=torch.float32 if low else gy.dtype)  # (N, in)
    for a in range(0, out_f, chunk_rows):
        b = min(a + chunk_rows, out_f)
        w = q.materialize(packed, dtype=gy.dtype, device=gy.device, rows=slice(a, b))  # (b - a, in)
        if low:
            gx.add_(g2[:, a:b] @ w)
        else:
            gx.addmm_(g2[:, a:b], w)
    return gx.to(gy.dtype).reshape(*gy.shape[:-1], in_f)


class QuantizedMatmul(torch.autograd.Function):
    """``x @ W^T`` for packed W; backward re-materializes W. Saves no tensor at all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: Quantizer, packed: PackedWeight, chunk_rows: int | None,
                fast: bool) -> torch.Tensor:
        # Python references, not save_for_backward: the packed buffers already live in the module, and
        # saved-tensor hooks (offloading, checkpointing) must never see a copy of them.
        ctx.q, ctx.packed, ctx.chunk_rows, ctx.fast = q, packed, chunk_rows, fast
        ctx.x_dtype = x.dtype
        return base_forward(x, q, packed, chunk_rows, fast)

    @staticmethod
    @once_differentiable
    def backward(ctx, gy: torch.Tensor):
        gx = None
        if ctx.needs_input_grad[0]:
            gx = base_backward(gy, ctx.q, ctx.packed, ctx.chunk_rows, ctx.fast).to(ctx.x_dtype)
        return gx, None, None, None, None


def quantized_matmul(x: torch.Tensor, q: Quantizer, packed: PackedWeight, *, chunk_rows: int | None = None,
                     fast: bool = False) -> torch.Tensor:
    """``[..., in] -> [..., out]``: ``x @ W^T`` in the compute dtype, differentiable in x only."""
    dt = compute_dtype(x)
    return QuantizedMatmul.apply(x.to(dt), q, packed, chunk_rows, fast)
