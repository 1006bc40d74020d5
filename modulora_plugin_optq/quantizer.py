"""OPTQQuantizer: GPTQ on one weight, stored as the GPTQ v1 checkpoint tensors bit for bit.

Storage of an ``[out, in] = [N, K]`` weight with ``G = ceil(K / group)`` groups:

- ``qweight`` int32 ``[ceil(K * bits / 32), N]``: the codes of ``W^T``, packed along the input dimension;
- ``qzeros`` int32 ``[G, ceil(N * bits / 32)]``: zero points minus one, packed along the output dimension;
- ``scales`` float16 ``[G, N]``; ``g_idx`` int32 ``[K]``: the group of each input column.

``W[n, k] = scales[g_idx[k], n] * (q[k, n] - zero[g_idx[k], n])``. Output rows are columns of every tensor,
so a block of rows decodes from its own columns (and the qzeros words that hold them) alone.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from modulora_core import (
    Capabilities,
    CheckpointError,
    InvalidWeightError,
    PackedWeight,
    Quantizer,
    kernel,
    native,
)

from .config import OPTQConfig
from .gptq import GPTQResult, gptq_quantize
from .packing import pack_rows, packed_len, unpack_rows, zeros_v1_cols, zeros_v2_to_v1
from .storage import FAMILY, FORMAT_VERSION, check_tensors

# Measured ||W - Q(W)||_F / ||W||_F of GPTQ against the kit's synthetic Hessians (which weigh columns
# unequally, so the plain weight error is above round-to-nearest's: GPTQ minimizes the output error), the
# worst of 4 seeds on the kit's shapes and 512x512, symmetric, group 128: Gaussian, Student-t(3). Bounds
# are 1.3x these; smaller groups and asymmetric do better, whole-row groups up to 1.55x worse.
_MEASURED = {2: (0.683, 0.765), 3: (0.293, 0.492), 4: (0.136, 0.268), 8: (0.0079, 0.0173)}
BOUND_MARGIN = 1.3
# g_idx -> (its version counter, "is it the plain order i // group?"): answering that reads g_idx back to the
# host, a sync that must not happen on every forward; it is decided once per g_idx tensor and re-decided
# only if the tensor is written in place (load_state_dict bumps _version)
# (keyed by id with a weak reference to check identity: a WeakKeyDictionary would compare tensors with ==)
_PLAIN_ORDER: dict[int, tuple[weakref.ref, int, bool]] = {}


def plain_group_order(g_idx: torch.Tensor, group_size: int) -> bool:
    """True when ``g_idx`` ``[K]`` is ``arange(K) // group_size`` with whole groups (cached per tensor)."""
    k = g_idx.shape[0]
    hit = _PLAIN_ORDER.get(id(g_idx))
    if hit is not None and hit[0]() is g_idx and hit[1] == g_idx._version:
        return hit[2]
    plain = k % group_size == 0 and torch.equal(
        g_idx, torch.arange(k, device=g_idx.device, dtype=g_idx.dtype) // group_size)
    key = id(g_idx)
    _PLAIN_ORDER[key] = (weakref.ref(g_idx, lambda _r: _PLAIN_ORDER.pop(key, None)), g_idx._version, plain)
    return plain


class OPTQQuantizer(Quantizer):
    """OPTQ / GPTQ 2/3/4/8-bit with groups, act-order, static groups; GPTQ v1 storage."""

    name = FAMILY
    config_class = OPTQConfig
    format_version = FORMAT_VERSION
    export_formats = ("gptq",)  # save_quantized(..., format="gptq") writes a GPTQ v1 checkpoint

    def capabilities(self, config: OPTQConfig) -> Capabilities:
        gauss, heavy = (BOUND_MARGIN * m for m in _MEASURED[config.bits])
        if config.group_size == -1:
            gauss, heavy = 1.6 * gauss, 1.6 * heavy
        # per group: a float16 scale and a packed zero; per input column: an int32 g_idx, which costs
        # 32 / out bits per weight (budgeted for out >= 64, the kit's smallest); ragged ends pad a word
        g = config.group_size if config.group_size > 0 else 64
        return Capabilities(
            needs_calibration=True,
            bits=config.bits,
            # integer codes times float16 scales are exact in float32, and in float64 (gradcheck)
            dtypes=("float32", "float16", "bfloat16", "float64"),
            max_relative_error=gauss,
            max_relative_error_heavy_tailed=heavy,
            max_bits_per_weight=config.bits + (16 + config.bits) / g + 32 / 64 + 0.01,
        )

    def quantize(self, weight: torch.Tensor, config: OPTQConfig,
                 hessian: torch.Tensor | None = None) -> dict[str, Any]:
        """GPTQ of ``weight`` ``[out, in]`` against ``hessian`` ``[in, in]`` (``X^T X``, any positive scale)."""
        if hessian is None:
            raise InvalidWeightError("optq needs the input Hessian X^T X of the layer; pass calibration data")
        if bool((hessian.diagonal() < 0).any()):
            raise InvalidWeightError("optq: the Hessian has negative diagonal entries, so it is not X^T X; "
                                     "check how it was accumulated")
        res = gptq_quantize(weight, hessian, bits=config.bits, group_size=config.group_size, sym=config.sym,
                            desc_act=config.desc_act, static_groups=config.static_groups,
                            damp_percent=config.damp_percent, block_size=config.block_size,
                            act_group_aware=config.act_group_aware, mse=config.mse)
        return {"result": res, "config": config, "shape": tuple(int(s) for s in weight.shape),
                "dtype": weight.dtype}

    def pack(self, state: dict[str, Any]) -> PackedWeight:
        cfg: OPTQConfig = state["config"]
        res: GPTQResult = state["result"]
        tensors = {
            "qweight": pack_rows(res.codes.T, cfg.bits).contiguous(),  # (K * bits / 32, N)
            "qzeros": zeros_v2_to_v1(res.zeros, cfg.bits).contiguous(),  # (G, N * bits / 32)
            "scales": res.scales.contiguous(),  # (G, N)
            "g_idx": res.g_idx.contiguous(),  # (K,)
        }
        return PackedWeight(self.name, cfg, state["shape"], state["dtype"], tensors, self.format_version)

    def packed_nbytes(self, shape: tuple[int, int], config: OPTQConfig) -> int:
        """Exact storage bytes of an ``(out, in)`` weight: the four tensors of :func:`check_tensors`."""
        n, k = int(shape[0]), int(shape[1])
        g = -(-k // config.group_size) if config.group_size > 0 else 1
        return 4 * packed_len(k, config.bits) * n + 4 * g * packed_len(n, config.bits) + 2 * g * n + 4 * k

    def unpack(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> PackedWeight:
        packed = super().unpack(tensors, metadata)
        if packed.format_version != self.format_version:
            raise CheckpointError(f"optq packed weight has format_version {packed.format_version}; this plugin "
                                  f"reads {self.format_version}")
        check_tensors(packed.tensors, packed.config, packed.shape)
        return packed

    def _decode_T(self, packed: PackedWeight, dtype: torch.dtype, device: Any, a: int, b: int) -> torch.Tensor:
        """``W[a:b].T`` as ``[K, b - a]``: computed in float32 (float64 for float64), then cast."""
        cfg: OPTQConfig = packed.config
        n, k = packed.shape
        t = packed.tensors
        if cfg.bits == 4 and dtype != torch.float64 and device in (None, "cpu", torch.device("cpu")):
            wt = _decode_t_native(t["qweight"], t["qzeros"], t["scales"], t["g_idx"], k, a, b)
            if wt is not None:
                return wt if dtype == torch.float32 else wt.to(dtype)
        qweight, qzeros, scales, g_idx = t["qweight"][:, a:b], t["qzeros"], t["scales"][:, a:b], t["g_idx"]
        if device is not None:
            qweight, qzeros, scales, g_idx = (x.to(device) for x in (qweight, qzeros, scales, g_idx))
        work = torch.float64 if dtype == torch.float64 else torch.float32
        w = unpack_rows(qweight, cfg.bits, k).to(work)  # (K, R)
        z = zeros_v1_cols(qzeros, cfg.bits, n, a, b).to(work)  # (G, R)
        s = scales.to(work)  # (G, R)
        gs = cfg.group_size if cfg.group_size > 0 else k
        if plain_group_order(t["g_idx"], gs):
            # plain group order: broadcast each group's row, no [K, R] gathers
            return _scale_groups(w, z, s, gs, dtype)
        # act-order g_idx (or a ragged last group): one gather per input column
        gi = g_idx.long()
        w.sub_(z.index_select(0, gi)).mul_(s.index_select(0, gi))
        return w.to(dtype)

    def matmul_small(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor | None:
        """Decode path ``[N, in] -> [N, out]`` from ``qweight``: 4 bits, plain group order (no act-order)."""
        cfg: OPTQConfig = packed.config
        n, k = packed.shape
        gs = cfg.group_size if cfg.group_size > 0 else k
        t = packed.tensors
        if cfg.bits != 4:
            return None
        plain = gs % 8 == 0 and plain_group_order(t["g_idx"], gs)
        if x.dtype != torch.float64:  # the CPU kernel takes act-order too: each term scaled by its own group
            y = _gemv_native(x, t["qweight"], t["qzeros"], t["scales"], None if plain else t["g_idx"], gs)
            if y is not None:
                return y
        if not plain:
            return None
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        z = zeros_v1_cols(t["qzeros"], cfg.bits, n, 0, n).to(work)  # (G, out), small
        return _gemv_4bit(x.to(work), t["qweight"], z, t["scales"].to(work)).to(x.dtype)

    def materialize(self, packed: PackedWeight, *, dtype: torch.dtype, device: torch.device | str | None = None,
                    rows: slice | None = None) -> torch.Tensor:
        """Dense ``[out, in]`` weight, or ``[len(rows), in]`` decoded from those rows' columns only."""
        a, b = _range(rows, packed.shape[0])
        return self._decode_T(packed, dtype, device, a, b).T

    def materialize_T(self, packed: PackedWeight, *, dtype: torch.dtype, device: torch.device | str | None = None,
                      cols: slice | None = None) -> torch.Tensor:
        """``[in, out]`` (or ``[in, len(cols)]``): the storage's own layout, so no transpose copy."""
        a, b = _range(cols, packed.shape[0])
        return self._decode_T(packed, dtype, device, a, b)

    def export_checkpoint(self, model: Any, directory: Any, *, format: str, tokenizer: Any = None) -> Any:
        """Write ``model`` (every quantized layer optq) as a ``format`` checkpoint; only ``"gptq"`` (v1)."""
        from .gptq_format import save_gptq  # lazy: transformers only when writing

        if format not in self.export_formats:
            raise CheckpointError(f"optq writes formats {self.export_formats}, not {format!r}")
        return save_gptq(model, directory, tokenizer=tokenizer)


@kernel
def _scale_groups(w: torch.Tensor, z: torch.Tensor, s: torch.Tensor, gs: int, dtype: torch.dtype) -> torch.Tensor:
    """``[K, R]`` codes (float) -> ``(codes - z) * s`` per group of ``gs`` input rows, in ``dtype``; in place
    eagerly (one dense copy), one fused loop with the cast when compiled."""
    k = w.shape[0]
    w.view(k // gs, gs, -1).sub_(z[:, None]).mul_(s[:, None])
    return w.to(dtype)


@kernel
def _gemv_4bit(x: torch.Tensor, qweight: torch.Tensor, z: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``x [N, K]`` times ``W^T`` from 4-bit ``qweight`` ``[K / 8, out]`` (8 codes per int32 word, along K) and
    ``[G, out]`` zeros and scales: ``[N, out]`` in x's dtype, each group's dot product scaled once."""
    n, k = x.shape
    groups, out_f = s.shape
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=qweight.device).view(1, 1, 8, 1)
    q = ((qweight.view(groups, -1, 1, out_f) >> shifts) & 0xF).to(x.dtype)  # (G, gs / 8, 8, out)
    part = (q.unsqueeze(0) * x.view(n, groups, -1, 8, 1)).sum((2, 3))  # (N, G, out)
    xs = x.view(n, groups, -1).sum(-1, keepdim=True)  # (N, G, 1)
    return ((part - z * xs) * s).sum(1)  # (N, out)


def _gemv_native(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 g_idx: torch.Tensor | None, gs: int) -> torch.Tensor | None:
    """``x [N, K] @ W^T -> [N, out]`` by the CPU kernel for 4 bits, or None where it cannot run. ``g_idx`` None:
    plain group order (groups of ``gs``), each group's dot product scaled once; else the ``[K]`` act-order map."""
    xf = x.to(torch.float32).contiguous()
    gi = None if g_idx is None else g_idx.to(torch.int32).contiguous()
    so = native.lib(xf, qweight, qzeros, scales, *(() if gi is None else (gi,)))
    if so is None or x.shape[0] > native.MAX_ROWS or scales.dtype not in native.SKIND:
        return None
    groups, out_f = scales.shape
    y = xf.new_empty(x.shape[0], out_f)
    if so.optq4_gemv(xf.data_ptr(), x.shape[0], x.shape[1], qweight.data_ptr(), qzeros.data_ptr(),
                     scales.data_ptr(), native.SKIND[scales.dtype], native.ptr(gi), gs, groups, out_f, y.data_ptr(),
                     native.threads()):
        return None
    return y.to(x.dtype)


def _decode_t_native(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                     k: int, a: int, b: int) -> torch.Tensor | None:
    """``W[a:b].T`` as float32 ``[K, b - a]`` for 4 bits by the CPU kernel (the same ``(q - z) * s`` in float32 as
    the torch code, in one pass), or None where it cannot run."""
    gi = g_idx.to(torch.int32).contiguous()
    so = native.lib(qweight, qzeros, scales, gi)
    if so is None or scales.dtype not in native.SKIND:
        return None
    groups, out_f = scales.shape
    wt = native.empty((k, b - a))  # huge pages: a dense weight's page faults cost more than the decode
    if so.optq4_dequant_t(qweight.data_ptr(), qzeros.data_ptr(), scales.data_ptr(), native.SKIND[scales.dtype],
                          gi.data_ptr(), groups, k, out_f, a, b, wt.data_ptr(), native.threads()):
        return None
    return wt


def _range(rows: slice | None, n: int) -> tuple[int, int]:
    if rows is None:
        return 0, n
    start, stop, step = rows.indices(n)
    if step != 1:
        raise InvalidWeightError(f"optq: row blocks must be contiguous (step 1), got step {step}")
    return start, max(start, stop)
