"""HQQ as a ModuLoRA quantizer: hqq's ``Quantizer.quantize`` / ``dequantize`` on one ``[out, in]`` weight.

Storage is hqq's own: ``W_q``, the bit-packed codes exactly as hqq packs them (uint8, or int32 for 3-bit),
and ``scale`` / ``zero`` in hqq's shapes (``[N, 1]`` for axis 1, ``[1, M]`` for axis 0; N, M groups) and in
``meta_dtype``. They are the tensors ``HQQLinear`` holds under the same names. Dequantization is
``W = ((W_q_unpacked - zero) * scale).reshape(out, in)``, in the dtype asked for.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import torch

from modulora_core import Capabilities, InvalidWeightError, PackedWeight, PluginError, Quantizer

from .config import HQQ_DEFAULT_OPT_PARAMS, HQQConfig
from .packing import CODES_PER_WORD, PACKING, read_codes

# Declared ||W - Q(W)||_F / ||W||_F bounds at group size <= 64 with hqq's default solver: about 1.3x the
# worst error measured on Gaussian / Student-t(3) weights, 64x128 .. 512x1024 (see README). 1-bit HQQ
# lands above 1 on Gaussian weights: its l_p (p < 1) objective favours sparse errors over a small
# Frobenius norm.
_GAUSS_BOUND = {1: 1.40, 2: 0.57, 3: 0.25, 4: 0.12, 8: 0.007}
_HEAVY_BOUND = {1: 1.25, 2: 0.70, 3: 0.35, 4: 0.17, 8: 0.0105}
# stored bits per code: 3-bit packs 10 codes in 32 bits
_CODE_BITS = {1: 1.0, 2: 2.0, 3: 3.2, 4: 4.0, 8: 8.0}

# hqq's Quantizer.quantize takes no solver settings: it calls the class attribute ``optimize_weights`` with
# hqq's defaults. Non-default settings swap in a partial for the duration of one call; the lock keeps two
# threads of ours from seeing each other's settings.
_SOLVER_LOCK = threading.Lock()


def _hqq_quantizer() -> Any:
    """hqq's ``Quantizer`` class, imported on first use (hqq pulls in torch._dynamo: ~2 s at import)."""
    try:
        from hqq.core.quantize import Quantizer as HQQQuantizer
    except ImportError as e:
        raise PluginError(
            f"modulora-plugin-hqq needs the hqq library ({e}); install it: pip install 'hqq>=0.2'"
        ) from e
    return HQQQuantizer


@contextmanager
def _solver_settings(hqq_cls: Any, opt_params: dict[str, float]) -> Iterator[None]:
    with _SOLVER_LOCK:
        if opt_params == HQQ_DEFAULT_OPT_PARAMS:
            yield
            return
        original = hqq_cls.__dict__["optimize_weights"]
        hqq_cls.optimize_weights = functools.partial(original, opt_params=dict(opt_params))
        try:
            yield
        finally:
            hqq_cls.optimize_weights = original


def _bound_factors(config: HQQConfig) -> tuple[float, float]:
    """(Gaussian, heavy-tailed) multipliers of the group-size-64 bounds, from the same measurements."""
    g = config.group_size
    # larger groups: one outlier stretches the range of more weights; whole rows measured up to 2048 wide
    gauss, heavy = (1.0, 1.0) if 0 < g <= 64 else (1.15, 1.3) if 0 < g <= 128 else (1.6, 4.0)
    if not config.optimize or config.opt_params() != HQQ_DEFAULT_OPT_PARAMS:
        # plain min/max rounding (and, as a guess, other solver settings: iters=1 measured inside it);
        # 1-bit depends most on the solver
        rough = (1.65, 2.6) if config.bits == 1 else (1.1, 1.35)
        gauss, heavy = gauss * rough[0], heavy * rough[1]
    return gauss, heavy


def _hqq_version() -> str:
    try:
        return metadata.version("hqq")
    except metadata.PackageNotFoundError:
        return "unknown"


class HQQQuantizer(Quantizer):
    """Half-Quadratic Quantization, 1/2/3/4/8 bits, calibration-free, through the hqq library."""

    name = "hqq"
    config_class = HQQConfig
    format_version = 1

    def capabilities(self, config: HQQConfig) -> Capabilities:
        g, bits = config.group_size, config.bits
        g_eff = g if g > 0 else 64  # whole-row groups: the budget assumes rows of >= 64 inputs
        gauss, heavy = _bound_factors(config)
        code_bits = _CODE_BITS[bits]
        if bits == 3:
            # padding to 10 rows of codes: axis 0 pads each group; axis 1 pads the group count, at most 9
            # groups, i.e. <= 9% for weights of >= 100 groups
            code_bits *= (-(-g_eff // 10) * 10 / g_eff) if config.axis == 0 else 1.09
        meta_bits = 2 * (16 if config.meta_dtype == "float16" else 32)  # a scale and a zero point per group
        return Capabilities(
            bits=bits,
            # float64 is exact (the kit gradchecks in it); float16/bfloat16 round (q - zero) * scale in
            # that dtype, as hqq does with that compute_dtype
            dtypes=("float32", "float16", "bfloat16", "float64"),
            row_chunking=config.axis == 1,
            in_multiple=g if g > 0 else 1,
            # hqq packs k codes per byte along dim 0 of the code matrix: its row count must split into k slabs
            out_multiple=self._pack_multiple(config),
            max_relative_error=_GAUSS_BOUND[bits] * gauss,
            max_relative_error_heavy_tailed=_HEAVY_BOUND[bits] * heavy,
            max_bits_per_weight=code_bits + meta_bits / g_eff + 0.01,
        )

    @staticmethod
    def _pack_multiple(config: HQQConfig) -> int:
        """Rows the weight must be a multiple of for hqq's bit packing (3-bit pads instead)."""
        packs_rows = config.axis == 1 or config.group_size == -1
        return CODES_PER_WORD[config.bits] if packs_rows and config.bits != 3 else 1

    def check_shape(self, shape: tuple[int, int], config: HQQConfig) -> None:
        """Raise :class:`InvalidWeightError` unless hqq can quantize an ``(out, in)`` weight so."""
        out_f, in_f = shape
        if config.group_size > 0 and in_f % config.group_size:
            raise InvalidWeightError(
                f"hqq: group_size={config.group_size} does not divide in_features={in_f}; use a group size "
                f"(a multiple of 8) that divides {in_f}, or group_size=-1 for one group per row")
        k = self._pack_multiple(config)
        if out_f % k:
            raise InvalidWeightError(
                f"hqq: out_features={out_f} must be a multiple of {k} for {config.bits}-bit: hqq packs {k} "
                "codes per byte across rows; pad the layer or leave it unquantized")

    def packed_nbytes(self, shape: tuple[int, int], config: HQQConfig) -> int:
        """Exact storage bytes of an ``(out, in)`` weight, from hqq's layout: the code matrix is ``[N, g]``
        (axis 1) or ``[g, N]`` (axis 0) for N = out * in / g groups, bit-packed along its dim 0; a scale
        and a zero point per group in ``meta_dtype``."""
        out_f, in_f = int(shape[0]), int(shape[1])
        self.check_shape((out_f, in_f), config)
        g = config.effective_group_size((out_f, in_f))
        n_groups = out_f * in_f // g
        rows, cols = (n_groups, g) if config.axis == 1 else (g, n_groups)
        k = CODES_PER_WORD[config.bits]
        # 3-bit: 10 codes per int32 word, rows padded up; the others: k codes per uint8, rows divide evenly
        code_bytes = -(-rows // k) * cols * 4 if config.bits == 3 else rows // k * cols
        meta_bytes = 2 if config.meta_dtype == "float16" else 4
        return code_bytes + 2 * n_groups * meta_bytes

    def quantize_weight(self, weight: torch.Tensor, config: HQQConfig,
                        hessian: torch.Tensor | None = None) -> PackedWeight:
        """Validate and quantize; a shape hqq cannot group or pack gets a message naming group size/bits."""
        if isinstance(weight, torch.Tensor) and weight.dim() == 2 and isinstance(config, HQQConfig):
            self.check_shape((weight.shape[0], weight.shape[1]), config)
        return super().quantize_weight(weight, config, hessian)

    def quantize(self, weight: torch.Tensor, config: HQQConfig, hessian: torch.Tensor | None = None) -> dict:
        """hqq's ``Quantizer.quantize`` on ``[out, in]`` ``weight`` (finiteness is checked by
        ``quantize_weight``); ``hessian`` is ignored, HQQ needs no calibration."""
        shape = (int(weight.shape[0]), int(weight.shape[1]))
        self.check_shape(shape, config)
        hqq = _hqq_quantizer()
        with _solver_settings(hqq, config.opt_params()):
            w_q, meta = hqq.quantize(
                weight.detach(), nbits=config.bits, channel_wise=True,
                group_size=config.effective_group_size(shape), optimize=config.optimize,
                round_zero=config.resolved_round_zero(), axis=config.axis, bitpack=True,
                view_as_float=False, device=str(weight.device),
            )
        # the cast HQQLinear applies to its meta (compute_dtype), after the codes were chosen in float32
        meta_dtype = torch.float16 if config.meta_dtype == "float16" else torch.float32
        return {"W_q": w_q, "scale": meta["scale"].to(meta_dtype), "zero": meta["zero"].to(meta_dtype),
                "config": config, "shape": shape, "dtype": weight.dtype}

    def pack(self, state: dict) -> PackedWeight:
        cfg: HQQConfig = state["config"]
        tensors = {k: state[k].contiguous() for k in ("W_q", "scale", "zero")}
        extra = {"packing": PACKING[cfg.bits], "hqq_version": _hqq_version()}
        return PackedWeight(self.name, cfg, state["shape"], state["dtype"], tensors, self.format_version,
                            extra)

    def materialize(self, packed: PackedWeight, *, dtype: torch.dtype,
                    device: torch.device | str | None = None, rows: slice | None = None) -> torch.Tensor:
        """Dense ``[out, in]`` weight, or ``[len(rows), in]``: hqq's ``Quantizer.dequantize`` for the whole
        weight, only the packed rows that hold ``rows`` for a block (axis 1)."""
        cfg: HQQConfig = packed.config
        out_f, in_f = packed.shape
        start, stop = 0, out_f
        if rows is not None:
            start, stop, step = rows.indices(out_f)
            if step != 1:
                raise InvalidWeightError(f"hqq: row blocks must be contiguous (step 1), got step {step}")
            stop = max(start, stop)
        # bfloat16 keeps 8 mantissa bits: hqq's ops in bfloat16 would round the float16 scale and zero, then
        # the product, twice off the stored weight; work in float32 and round once (float16/32: hqq's own ops)
        work = torch.float32 if dtype == torch.bfloat16 else dtype
        if (start, stop) == (0, out_f):
            w = self._dequantize_whole(packed, work)
        elif cfg.axis == 1:
            w = self._dequantize_rows(packed, work, start, stop)
        else:  # axis 0 groups span rows: dequantize everything, keep a copy of the block, free the rest
            w = self._dequantize_whole(packed, work)[start:stop].clone()
        w = w.to(dtype)
        return w if device is None else w.to(device)

    def _dequantize_whole(self, packed: PackedWeight, dtype: torch.dtype) -> torch.Tensor:
        """hqq's own dequantization over the stored tensors: ``[out, in]`` in ``dtype``."""
        cfg: HQQConfig = packed.config
        t = packed.tensors
        meta = {
            "nbits": cfg.bits, "group_size": cfg.effective_group_size(packed.shape), "axis": cfg.axis,
            "shape": torch.Size(packed.shape), "packing": PACKING[cfg.bits], "view_as_float": False,
            "compute_dtype": dtype, "scale": t["scale"].to(dtype), "zero": t["zero"].to(dtype),
        }
        return _hqq_quantizer().dequantize(t["W_q"], meta)

    def _dequantize_rows(self, packed: PackedWeight, dtype: torch.dtype, start: int,
                         stop: int) -> torch.Tensor:
        """Rows ``[start, stop)`` of an axis-1 weight: ``[stop - start, in]``, the same ops as hqq's."""
        cfg: HQQConfig = packed.config
        in_f = packed.shape[1]
        g = cfg.effective_group_size(packed.shape)
        per_row = in_f // g  # groups per row; group r covers inputs of row r // per_row
        g0, g1 = start * per_row, stop * per_row
        t = packed.tensors
        codes = read_codes(t["W_q"], cfg.bits, g0, g1, dtype)  # (g1 - g0, g)
        w = (codes - t["zero"][g0:g1].to(dtype)) * t["scale"][g0:g1].to(dtype)  # as hqq: (W_r - zero) * scale
        return w.reshape(stop - start, in_f)
