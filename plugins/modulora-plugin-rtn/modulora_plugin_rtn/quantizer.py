"""Round-to-nearest INT-k with per-group scales (asymmetric: scale + zero point; symmetric: scale only).

Storage per ``[out, in]`` weight: ``codes`` uint8 ``[out, packed_cols(in, bits)]`` (bit-packed per row),
``scales`` float16 ``[out, groups]`` and, when asymmetric, ``zeros`` uint8 ``[out, groups]``.
Dequantization: ``W[o, i] = scales[o, g] * (code[o, i] - zero[o, g])`` with ``g = i // group_size``.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, field_validator

from modulora_core import Capabilities, PackedWeight, Quantizer, QuantizerConfig, kernel, native

from .bitpack import pack_codes, packed_cols, unpack_codes

# Declared ||W - Q(W)||_F / ||W||_F bounds for Gaussian weights at group size 64 (measured about 0.75x
# of these; see tests), keyed by bits. Whole-row groups get a looser bound.
_GAUSS_BOUND = {2: 0.60, 3: 0.25, 4: 0.12, 8: 0.008}


class RTNConfig(QuantizerConfig):
    """Round-to-nearest config."""

    family = "rtn"
    bits: Literal[2, 3, 4, 8] = Field(4, description="bits per weight code")
    group_size: int = Field(64, description="weights per scale along the input dimension; -1: one per row")
    symmetric: bool = Field(False, description="symmetric (no zero point) instead of min/max asymmetric")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v < 8:
            raise ValueError(f"group_size must be -1 (one group per row) or >= 8, got {v}")
        return v


class RTNQuantizer(Quantizer):
    """Round-to-nearest INT-k (2/3/4/8 bits)."""

    name = "rtn"
    config_class = RTNConfig
    format_version = 1

    def capabilities(self, config: RTNConfig) -> Capabilities:
        g = config.group_size
        # fp16 scale (+ uint8 zero) per group. A row of in_features = 64k holds at most k * ceil(64 / g)
        # groups, so this budget holds for every in_features that is a multiple of 64 (g > 64 and whole-row
        # groups included: a 64-wide row is one group); ragged in_features pay one more group per row.
        overhead = (16 + (0 if config.symmetric else 8)) * (math.ceil(64 / g) if g > 0 else 1) / 64
        bound = _GAUSS_BOUND[config.bits] * (1.0 if 0 < g <= 128 else 1.6)
        if config.symmetric:
            bound *= 1.6
        return Capabilities(
            bits=config.bits,
            # codes x fp16 scales are exact in float32 and float64 alike; float64 lets the kit gradcheck
            dtypes=("float32", "float16", "bfloat16", "float64"),
            max_relative_error=bound,
            max_relative_error_heavy_tailed=bound * 2.5,
            # codes take exactly `bits` per weight when in_features is a multiple of 8 (rows pad to 8 codes)
            max_bits_per_weight=config.bits + overhead + 0.01,
        )

    def quantize(self, weight: torch.Tensor, config: RTNConfig, hessian: torch.Tensor | None = None) -> dict:
        out_f, in_f = weight.shape
        g = config.group_size if config.group_size > 0 else in_f
        maxq = (1 << config.bits) - 1
        # a ragged last group is zero-padded: 0 is always inside the range, so padding moves no scale
        w = torch.nn.functional.pad(weight.detach().to(torch.float32), (0, (-in_f) % g))
        w = w.reshape(out_f, -1, g)  # (out, G, g)
        if config.symmetric:
            amax = w.abs().amax(-1)
            scale = (2 * amax / maxq).clamp_min(1e-8).half().float()  # round-trip: dequant uses fp16
            zero = torch.full_like(scale, float((maxq + 1) // 2))
        else:
            # include 0 in the range so an exact zero stays representable and a constant group is sane
            lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
            scale = ((hi - lo) / maxq).clamp_min(1e-8).half().float()
            zero = torch.round(-lo / scale).clamp(0, maxq)
        codes = torch.clamp(torch.round(w / scale[..., None]) + zero[..., None], 0, maxq)
        return {"codes": codes.reshape(out_f, -1)[:, :in_f].to(torch.uint8), "scales": scale.half(),
                "zeros": zero.to(torch.uint8), "config": config, "shape": (out_f, in_f), "dtype": weight.dtype}

    def pack(self, state: dict) -> PackedWeight:
        cfg: RTNConfig = state["config"]
        tensors = {"codes": pack_codes(state["codes"], cfg.bits), "scales": state["scales"].contiguous()}
        if not cfg.symmetric:
            tensors["zeros"] = state["zeros"].contiguous()
        return PackedWeight(self.name, cfg, state["shape"], state["dtype"], tensors, self.format_version)

    def packed_nbytes(self, shape: tuple[int, int], config: RTNConfig) -> int:
        """Exact storage bytes of an ``(out, in)`` weight: the layout in the module docstring."""
        out_f, in_f = int(shape[0]), int(shape[1])
        groups = -(-in_f // config.group_size) if config.group_size > 0 else 1
        per_group = 2 + (0 if config.symmetric else 1)  # fp16 scale (+ uint8 zero)
        return out_f * (packed_cols(in_f, config.bits) + groups * per_group)

    def materialize(self, packed: PackedWeight, *, dtype: torch.dtype, device=None,
                    rows: slice | None = None) -> torch.Tensor:
        cfg: RTNConfig = packed.config
        out_f, in_f = packed.shape
        r = rows if rows is not None else slice(0, out_f)
        t = packed.tensors
        g = cfg.group_size if cfg.group_size > 0 else in_f
        zeros = None if cfg.symmetric else t["zeros"][r]
        w = None
        if cfg.bits == 4 and in_f % g == 0 and g % 2 == 0 and dtype != torch.float64:
            w = _dequantize_native(t["codes"][r], t["scales"][r], zeros, in_f, dtype)
        if w is None:
            w = dequantize(t["codes"][r], t["scales"][r], zeros, cfg.bits, in_f, g, dtype)
        return w if device is None else w.to(device)

    def matmul_small(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor | None:
        """Decode path ``[N, in] -> [N, out]`` from the packed codes: 4 bits, whole groups of even size."""
        cfg: RTNConfig = packed.config
        in_f = packed.shape[1]
        g = cfg.group_size if cfg.group_size > 0 else in_f
        if cfg.bits != 4 or in_f % g or g % 2:
            return None
        t = packed.tensors
        if x.dtype != torch.float64:
            y = _gemv_native(x, t["codes"], t["scales"], None if cfg.symmetric else t["zeros"])
            if y is not None:
                return y
        zeros = t["scales"].new_full((1, 1), 8) if cfg.symmetric else t["zeros"]  # symmetric: zero 2^(bits-1)
        return gemv_4bit(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), t["codes"], t["scales"], zeros).to(x.dtype)


@kernel
def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, in_f: int,
               g: int, dtype: torch.dtype) -> torch.Tensor:
    """``[R, packed_cols]`` codes, ``[R, G]`` scales (and zeros; None: symmetric) -> ``[R, in_f]`` in ``dtype``.

    Computed in float32 (float64 for float64) and cast once, so float16/bfloat16 round the stored weight once;
    one fused loop when compiled.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    q = unpack_codes(codes, bits, in_f).to(work)  # (R, in)
    n = q.shape[0]
    pad = (-in_f) % g
    if pad:
        q = torch.nn.functional.pad(q, (0, pad))
    q = q.view(n, -1, g)  # (R, G, g)
    # in place: a row tile costs one dense tile of memory, not three
    if zeros is None:
        q.sub_(float((1 << bits) // 2))
    else:
        q.sub_(zeros.to(work)[..., None])
    w = q.mul_(scales.to(work)[..., None]).view(n, -1)[:, :in_f]
    return w if work == dtype else w.to(dtype)


@kernel
def gemv_4bit(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> torch.Tensor:
    """``x [N, in]`` (float32 or float64) times ``W^T`` for 4-bit codes ``[out, in / 2]`` (low nibble first) with ``[out, G]``
    scales and zeros: ``[N, out]`` in x's dtype, each group's dot product scaled once, no dense W.

    ``sum_i s (q_i - z) x_i = s (sum_i q_i x_i - z sum_i x_i)`` per group; even and odd inputs take the low
    and high nibbles of the same byte, so the unpack is two masks, not an interleave.
    """
    n, k = x.shape
    out_f, groups = scales.shape
    h = k // groups // 2  # bytes per group
    c = codes.view(1, out_f, groups, h)
    xe, xo = x[:, 0::2].reshape(n, 1, groups, h), x[:, 1::2].reshape(n, 1, groups, h)
    part = ((c & 0xF).to(x.dtype) * xe + (c >> 4).to(x.dtype) * xo).sum(-1)  # (N, out, G)
    xs = x.view(n, 1, groups, 2 * h).sum(-1)  # (N, 1, G)
    return ((part - zeros.to(x.dtype) * xs) * scales.to(x.dtype)).sum(-1)  # (N, out)


def _gemv_native(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 zeros: torch.Tensor | None) -> torch.Tensor | None:
    """``x [N, in] @ W^T -> [N, out]`` by the CPU kernel (4 bits, whole even groups), or None where it cannot run."""
    xf = x.to(torch.float32).contiguous()
    so = native.lib(xf, codes, scales, *(() if zeros is None else (zeros,)))
    if so is None or x.shape[0] > native.MAX_ROWS or scales.dtype not in native.SKIND:
        return None
    out_f, groups = scales.shape
    y = xf.new_empty(x.shape[0], out_f)
    if so.rtn4_gemv(xf.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), codes.shape[1], scales.data_ptr(),
                    native.SKIND[scales.dtype], native.ptr(zeros), out_f, groups, y.data_ptr(), native.threads()):
        return None
    return y.to(x.dtype)


def _dequantize_native(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, in_f: int,
                       dtype: torch.dtype) -> torch.Tensor | None:
    """:func:`dequantize` for 4 bits and whole even groups by the CPU kernel (the same float32 products, one
    pass), or None where it cannot run; float16/bfloat16 are cast from float32 once."""
    so = native.lib(codes, scales, *(() if zeros is None else (zeros,)))
    if so is None or scales.dtype not in native.SKIND:
        return None
    rows, groups = scales.shape
    w = native.empty((rows, in_f))  # huge pages: a dense weight's page faults cost more than the decode
    so.rtn4_dequant(codes.data_ptr(), codes.shape[1], scales.data_ptr(), native.SKIND[scales.dtype],
                    native.ptr(zeros), rows, in_f, groups, w.data_ptr(), native.threads())
    return w if dtype == torch.float32 else w.to(dtype)
