"""NormalFloat-4 (QLoRA) and FP4 with optional double quantization, stored the way bitsandbytes stores them.

Storage of an ``[out, in]`` weight with ``n = out * in`` values in ``B = ceil(n / blocksize)`` blocks:

- ``codes`` uint8 ``[ceil(n / 2)]``: the 4-bit codes of the row-major flattened weight, two per byte, the
  first in the high nibble (byte for byte bitsandbytes' ``Params4bit`` data);
- without double quantization: ``absmax`` float32 ``[B]``;
- with it: ``absmax`` uint8 ``[B]``, ``absmax_scale`` float32 ``[ceil(B / 256)]``, ``absmax_offset``
  float32 ``[1]``, and ``absmax_code`` float32 ``[256]`` only for a weight taken over from bitsandbytes
  whose 8-bit map is not the standard one.

``W.flatten()[k] = LEVELS[code[k]] * absmax[k // blocksize]``. A block of rows covers a contiguous range of
the flattened weight, so it decodes from its own bytes and blocks only, whatever ``in % blocksize`` is.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from modulora_core import (
    Capabilities,
    CheckpointError,
    InvalidWeightError,
    PackedWeight,
    Quantizer,
    QuantizerConfig,
)

from .blockwise import (
    dequantize_4bit,
    dequantize_4bit_native,
    dequantize_absmax,
    gemv_4bit,
    gemv_4bit_native,
    num_blocks,
    pack_nibbles,
    quantize_4bit,
    quantize_absmax,
)
from .levels import NESTED_BLOCKSIZE, byte_table

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bitsandbytes' 4-bit kernels accept

# Measured ||W - Q(W)||_F / ||W||_F with double quantization (without it, at most 0.001 lower): the worst
# of 4 seeds on the conformance kit's shapes (64x128, 96x256, 256x64) and on 1024x1024 and 2048x512,
# std 0.02. Columns: nf4 Gaussian, nf4 Student-t(3), fp4 Gaussian, fp4 Student-t(3). Heavy tails hurt more
# as blocks grow, since one outlier sets the scale of the whole block. The declared bounds are 1.3x these.
_MEASURED = {
    32: (0.0885, 0.1067, 0.1163, 0.1573),
    64: (0.0926, 0.1305, 0.1238, 0.1957),
    128: (0.0969, 0.1621, 0.1308, 0.2465),
    256: (0.1000, 0.2003, 0.1378, 0.3038),
    512: (0.1043, 0.2394, 0.1451, 0.3698),
    1024: (0.1066, 0.3032, 0.1543, 0.4236),
    2048: (0.1111, 0.3901, 0.1625, 0.4977),
    4096: (0.1202, 0.4914, 0.1799, 0.5535),
}
BOUND_MARGIN = 1.3


class NF4Config(QuantizerConfig):
    """bitsandbytes-style 4-bit config: the level set, the block size and double quantization."""

    family = "nf4"
    quant_type: Literal["nf4", "fp4"] = Field(
        "nf4", description="4-bit levels: 'nf4' (NormalFloat, QLoRA) or 'fp4' (bitsandbytes' float 4-bit)"
    )
    blocksize: int = Field(64, description=f"consecutive weights per absmax scale; one of {BLOCKSIZES}")
    double_quant: bool = Field(
        True, description="store the absmax scales in 8 bits (blocks of 256) plus an offset, as QLoRA does"
    )

    @field_validator("blocksize")
    @classmethod
    def _blocksize(cls, v: int) -> int:
        if v not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {BLOCKSIZES} (bitsandbytes' 4-bit block sizes), got {v}")
        return v


PRESETS: dict[str, NF4Config] = {
    "nf4": NF4Config(),
    "nf4-nodq": NF4Config(double_quant=False),
    "fp4": NF4Config(quant_type="fp4"),
    "fp4-nodq": NF4Config(quant_type="fp4", double_quant=False),
}


def preset_name(config: NF4Config) -> str:
    """The preset whose config equals ``config``, else the family name ``"nf4"``."""
    return next((name for name, cfg in PRESETS.items() if cfg == config), NF4Config.family)


def overhead_bits(config: NF4Config, n: int) -> float:
    """Storage bits per weight beyond the 4-bit codes for a weight of ``n`` values (odd byte included)."""
    b = num_blocks(n, config.blocksize)
    bits = 8 * (n % 2) / 2
    bits += 8 * b + 32 * num_blocks(b, NESTED_BLOCKSIZE) + 32 if config.double_quant else 32 * b
    return bits / n


def check_tensors(tensors: dict[str, torch.Tensor], config: NF4Config, shape: tuple[int, int]) -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` are the packed storage of a ``shape`` weight."""
    n = shape[0] * shape[1]
    b = num_blocks(n, config.blocksize)
    want: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {"codes": (torch.uint8, ((n + 1) // 2,))}
    if config.double_quant:
        want |= {"absmax": (torch.uint8, (b,)), "absmax_scale": (torch.float32, (num_blocks(b, NESTED_BLOCKSIZE),)),
                 "absmax_offset": (torch.float32, (1,))}
        if "absmax_code" in tensors:
            want["absmax_code"] = (torch.float32, (256,))
    else:
        want["absmax"] = (torch.float32, (b,))
    if set(tensors) != set(want):
        raise CheckpointError(f"nf4 packed weight {shape} ({config.to_json()}) has tensors {sorted(tensors)}; "
                              f"expected {sorted(want)}")
    for key, (dtype, shp) in want.items():
        t = tensors[key]
        if t.dtype != dtype or tuple(t.shape) != shp:
            raise CheckpointError(f"nf4 packed tensor {key!r} of a {shape} weight is {t.dtype} {tuple(t.shape)}; "
                                  f"expected {dtype} {shp} for {config.to_json()}")


class NF4Quantizer(Quantizer):
    """QLoRA's NormalFloat-4 (and bitsandbytes' FP4) with blockwise absmax and double quantization."""

    name = "nf4"
    config_class = NF4Config
    format_version = 1

    def capabilities(self, config: NF4Config) -> Capabilities:
        col = 0 if config.quant_type == "nf4" else 2
        gauss, heavy = (BOUND_MARGIN * m for m in _MEASURED[config.blocksize][col: col + 2])
        # budget: the asymptotic overhead plus what the kit's smallest weights (64 x 128) pay for the
        # offset and a partly filled 8-bit block
        budget = 4 + overhead_bits(config, 1 << 30) + (0.008 if config.double_quant else 0.001)
        return Capabilities(
            bits=4,
            # levels x float32 absmax are exact float32 products; float64 is their exact widening
            dtypes=("float32", "float16", "bfloat16", "float64"),
            max_relative_error=gauss,
            max_relative_error_heavy_tailed=heavy,
            max_bits_per_weight=budget,
        )

    def quantize(self, weight: torch.Tensor, config: NF4Config, hessian: torch.Tensor | None = None) -> dict:
        """``[out, in]`` float weight -> codes ``[n + n % 2]`` uint8 and absmax ``[B]`` (+ its 8-bit form)."""
        if not weight.is_floating_point() or weight.dim() != 2:
            raise InvalidWeightError(f"nf4: weight must be a 2-D float [out, in] tensor, got {weight.dtype} "
                                     f"{tuple(weight.shape)}")
        flat = weight.detach().reshape(-1).to(torch.float32)  # row-major, as bitsandbytes flattens
        codes, absmax = quantize_4bit(flat, config.quant_type, config.blocksize)
        state: dict[str, Any] = {"codes": codes, "absmax": absmax, "config": config,
                                 "shape": (int(weight.shape[0]), int(weight.shape[1])), "dtype": weight.dtype}
        if config.double_quant:
            state["qabsmax"], state["absmax_scale"], state["absmax_offset"] = quantize_absmax(absmax)
        return state

    def pack(self, state: dict) -> PackedWeight:
        cfg: NF4Config = state["config"]
        tensors = {"codes": pack_nibbles(state["codes"]).contiguous()}
        if cfg.double_quant:
            tensors |= {"absmax": state["qabsmax"].contiguous(), "absmax_scale": state["absmax_scale"].contiguous(),
                        "absmax_offset": state["absmax_offset"].contiguous()}
        else:
            tensors["absmax"] = state["absmax"].contiguous()
        return PackedWeight(self.name, cfg, state["shape"], state["dtype"], tensors, self.format_version)

    def packed_nbytes(self, shape: tuple[int, int], config: NF4Config) -> int:
        """Exact storage bytes of an ``(out, in)`` weight quantized here (the tensors of :func:`check_tensors`;
        a bitsandbytes take-over may add a 1 KiB ``absmax_code``)."""
        n = int(shape[0]) * int(shape[1])
        b = num_blocks(n, config.blocksize)
        scales = b + 4 * num_blocks(b, NESTED_BLOCKSIZE) + 4 if config.double_quant else 4 * b
        return (n + 1) // 2 + scales

    def unpack(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> PackedWeight:
        packed = super().unpack(tensors, metadata)
        if packed.format_version != self.format_version:
            raise CheckpointError(f"nf4 packed weight has format_version {packed.format_version}; this plugin "
                                  f"reads {self.format_version}")
        check_tensors(packed.tensors, packed.config, packed.shape)
        return packed

    def block_absmax(self, packed: PackedWeight, first: int, stop: int) -> torch.Tensor:
        """float32 absmax ``[stop - first]`` of blocks ``first .. stop - 1`` (decoding only those)."""
        t = packed.tensors
        if not packed.config.double_quant:
            return t["absmax"][first:stop]
        return dequantize_absmax(t["absmax"][first:stop], t["absmax_scale"], t["absmax_offset"], first=first,
                                 book=t.get("absmax_code"))

    def matmul_small(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor | None:
        """Decode path ``[N, in] -> [N, out]`` from the packed bytes (blocks must not straddle rows)."""
        cfg: NF4Config = packed.config
        out_f, in_f = packed.shape
        if in_f % cfg.blocksize:
            return None
        if x.dtype != torch.float64:  # the CPU kernel decodes the absmax itself
            y = gemv_4bit_native(x, packed.tensors["codes"], packed.tensors, cfg.quant_type, cfg.blocksize)
            if y is not None:
                return y
        absmax = self.block_absmax(packed, 0, out_f * in_f // cfg.blocksize)  # (blocks,) float32, small
        table = byte_table(cfg.quant_type, x.device)
        return gemv_4bit(x.to(torch.float64 if x.dtype == torch.float64 else torch.float32), packed.tensors["codes"], absmax, table, cfg.blocksize).to(x.dtype)

    def materialize(self, packed: PackedWeight, *, dtype: torch.dtype, device: torch.device | str | None = None,
                    rows: slice | None = None) -> torch.Tensor:
        """Dense ``[out, in]`` weight, or ``[len(rows), in]`` decoded from the bytes of those rows only."""
        cfg: NF4Config = packed.config
        out_f, in_f = packed.shape
        if rows is None:
            a, b = 0, out_f
        else:
            a, b, step = rows.indices(out_f)
            if step != 1:
                raise InvalidWeightError(f"nf4: row blocks must be contiguous (step 1), got step {step}")
            b = max(a, b)
        n, bs = out_f * in_f, cfg.blocksize
        s, e = a * in_f, b * in_f  # the rows' range in the flattened weight
        first, stop = s // bs, num_blocks(e, bs)
        start, end = first * bs, min(stop * bs, n)  # whole blocks around it (bs is even: byte-aligned)
        packed_bytes = packed.tensors["codes"][start // 2: (end + 1) // 2]
        vals = None
        if device is None or torch.device(device) == packed_bytes.device:  # the CPU kernel, absmax decoded inside
            vals = dequantize_4bit_native(packed_bytes, packed.tensors, first, cfg.quant_type, bs, end - start)
        if vals is None:
            absmax = self.block_absmax(packed, first, stop)
            if device is not None:
                packed_bytes, absmax = packed_bytes.to(device), absmax.to(device)
            vals = dequantize_4bit(packed_bytes, absmax, cfg.quant_type, bs, end - start)
        # computed in float32 like bitsandbytes, then cast: every dtype rounds the same float32 weight
        return vals[s - start: e - start].view(b - a, in_f).to(dtype)
