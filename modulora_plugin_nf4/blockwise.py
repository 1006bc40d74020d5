"""Blockwise absmax quantization as bitsandbytes does it: pure functions, tensors in, tensors out.

A weight is flattened row-major and cut into blocks of ``blocksize`` consecutive values (the last block
may be short). Each block is divided by its largest magnitude (``absmax``) and every value is replaced by
the nearest of 16 levels (NF4 or FP4); two 4-bit codes share a byte, the first in the high nibble.
Double quantization stores the float32 absmax values themselves in 8 bits: subtract their mean (the
``offset``), then quantize blocks of 256 to the nearest value of bitsandbytes' dynamic 8-bit map, each with
its own float32 scale.
"""

from __future__ import annotations

import torch

from modulora_core import kernel, native

from .levels import NESTED_BLOCKSIZE, byte_table, dynamic_map, encoder, levels

_TINY = 1e-38  # floor for a block's absmax in the division only: an all-zero block encodes as 0


def num_blocks(n: int, blocksize: int) -> int:
    """Number of blocks of ``blocksize`` (the last one possibly short) covering ``n`` values."""
    return -(-n // blocksize)


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``[n]`` -> ``[num_blocks, blocksize]``, the short last block padded with zeros (no effect on absmax)."""
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def quantize_4bit(flat: torch.Tensor, quant_type: str, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax 4-bit quantization of a ``[n]`` float tensor.

    Returns ``(codes, absmax)``: ``codes`` uint8 ``[n + n % 2]`` in 0..15 (an odd ``n`` gets the code of a
    0.0 appended, as bitsandbytes pads), ``absmax`` float32 ``[num_blocks(n, blocksize)]``.
    """
    n = flat.numel()
    x = _blocks(flat.to(torch.float32), blocksize)  # (B, bs)
    absmax = x.abs().amax(-1)  # (B,)
    denom = absmax.clamp_min(_TINY)
    if n % blocksize:  # bitsandbytes stores a short last block's absmax floored (matters only if all zero)
        absmax[-1] = denom[-1]
    # bitsandbytes multiplies full blocks by the reciprocal but divides a short last block; the two can
    # differ in the last bit of float32, which can move a value across a threshold
    scaled = x * (1.0 / denom)[:, None]
    if n % blocksize:
        scaled[-1] = x[-1] / denom[-1]
    scaled = scaled.clamp_(-1.0, 1.0).view(-1)[: n + n % 2]
    mids, order = encoder(quant_type, flat.device)
    codes = order[torch.bucketize(scaled, mids)]  # a value on a threshold takes the lower level
    return codes.to(torch.uint8), absmax


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``[2k]`` uint8 codes in 0..15 -> ``[k]`` bytes, the first code of each pair in the high nibble."""
    return (codes[0::2] << 4) | codes[1::2]


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """``[k]`` bytes -> ``[2k]`` uint8 codes (inverse of :func:`pack_nibbles`)."""
    return torch.stack((packed >> 4, packed & 0xF), dim=-1).view(-1)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantization of ``[B]`` float32 absmax values (bitsandbytes' ``compress_statistics``).

    Returns ``(qabsmax, scale, offset)``: uint8 ``[B]`` indices into :func:`dynamic_map`, float32
    ``[num_blocks(B, 256)]`` per-block scales and float32 ``[1]`` offset (the mean of ``absmax``).
    ``absmax ~= dynamic_map[qabsmax] * scale[i // 256] + offset``.
    """
    offset = absmax.mean().reshape(1)
    centered = _blocks(absmax - offset, NESTED_BLOCKSIZE)  # (B2, 256)
    scale = centered.abs().amax(-1)  # (B2,)
    # the scale of a block of equal absmax values is 0: dividing by a tiny floor encodes them as 0.0
    normed = (centered / scale.clamp_min(_TINY)[:, None]).view(-1)[: absmax.numel()]
    book = dynamic_map(absmax.device)
    # nearest value: the level at or below, or the one above when strictly closer (ties go down)
    lo = (torch.searchsorted(book, normed, right=True) - 1).clamp_(0, book.numel() - 1)
    hi = (lo + 1).clamp_(max=book.numel() - 1)
    up = (normed - book[hi]).abs() < (normed - book[lo]).abs()
    return torch.where(up, hi, lo).to(torch.uint8), scale, offset


def dequantize_absmax(qabsmax: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, *, first: int = 0,
                      book: torch.Tensor | None = None) -> torch.Tensor:
    """float32 absmax of blocks ``first .. first + len(qabsmax)`` from their 8-bit codes: ``[k]`` -> ``[k]``.

    ``scale`` is the whole ``[B2]`` scale vector (block ``j`` uses ``scale[j // 256]``); ``book`` defaults to
    :func:`dynamic_map`.
    """
    book = dynamic_map(qabsmax.device) if book is None else book
    idx = torch.arange(first, first + qabsmax.numel(), device=qabsmax.device) // NESTED_BLOCKSIZE
    # two float32 roundings (product, then sum), in bitsandbytes' order
    return book[qabsmax.long()] * scale[idx] + offset


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_type: str, blocksize: int,
                    count: int) -> torch.Tensor:
    """float32 values of whole blocks: ``packed`` ``[k]`` bytes (``2k >= count``) -> ``[count]``.

    ``packed[0]`` must start a block; ``absmax`` ``[>= ceil(count / blocksize)]`` holds that block's scale
    onward. ``W[i] = LEVELS[code[i]] * absmax[i // blocksize]``, one float32 product as bitsandbytes does.
    """
    return _decode_blocks(packed, absmax, byte_table(quant_type, packed.device), blocksize, count)


def _absmax_args(stored: dict[str, torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """The stored absmax tensors as the CPU kernels take them: ``(absmax,)`` float32, or with double
    quantization ``(qabsmax, 8-bit map, absmax_scale, absmax_offset)``."""
    am = stored["absmax"]
    if am.dtype != torch.uint8:
        return (am,)
    return am, stored.get("absmax_code", dynamic_map(device)), stored["absmax_scale"], stored["absmax_offset"]


def _absmax_ptrs(args: tuple[torch.Tensor, ...]) -> list[int | None]:
    """``absmax, qabsmax, book, ascale, aoffset`` pointers for the kernels (NULL where unused)."""
    return [args[0].data_ptr(), None, None, None, None] if len(args) == 1 else [None, *(t.data_ptr() for t in args)]


def dequantize_4bit_native(packed: torch.Tensor, stored: dict[str, torch.Tensor], first: int, quant_type: str,
                           blocksize: int, count: int) -> torch.Tensor | None:
    """:func:`dequantize_4bit` of blocks ``first ..`` by the CPU kernel, decoding their absmax itself (double
    quantization included): the same float32 products in one pass, bit-identical; None where it cannot run.
    ``packed``: the blocks' bytes; ``stored``: the packed weight's tensors (for the absmax)."""
    args = _absmax_args(stored, packed.device)
    lv = levels(quant_type, packed.device)
    so = native.lib(packed, lv, *args)
    if so is None or blocksize % 2 or packed.numel() * 2 < count or NESTED_BLOCKSIZE != 256:
        return None
    nb = num_blocks(count, blocksize)
    ptrs = _absmax_ptrs(args)
    # point at block `first`: absmax (or qabsmax) is indexed from there; the 8-bit scales by the global index
    if args[0].numel() < first + nb:
        return None
    ptrs[0 if len(args) == 1 else 1] = args[0][first:].data_ptr()
    out = native.empty((count,))  # huge pages: a dense weight's page faults cost more than the decode
    so.nf4_dequant(packed.data_ptr(), *ptrs, first, lv.data_ptr(), blocksize, count, out.data_ptr(),
                   native.threads())
    return out


def gemv_4bit_native(x: torch.Tensor, packed: torch.Tensor, absmax: dict[str, torch.Tensor], quant_type: str,
                     blocksize: int) -> torch.Tensor | None:
    """:func:`gemv_4bit` by the CPU kernel (float32 accumulation), or None where it cannot run:
    ``x [N, in]``, ``packed`` ``[out * in / 2]`` -> ``[N, out]``. ``absmax``: the packed tensors ``absmax``
    (float32 ``[out * in / blocksize]``, or with double quantization uint8 plus ``absmax_scale``,
    ``absmax_offset`` and optionally ``absmax_code``), decoded block by block inside the kernel."""
    xf = x.to(torch.float32).contiguous()
    lv = levels(quant_type, x.device)
    args = _absmax_args(absmax, x.device)
    so = native.lib(xf, packed, lv, *args)
    if so is None or x.shape[0] > native.MAX_ROWS or blocksize % 2 or NESTED_BLOCKSIZE != 256:
        return None
    n, k = x.shape
    out_f = packed.numel() * 2 // k
    y = xf.new_empty(n, out_f)
    ptrs = _absmax_ptrs(args)
    if so.nf4_gemv(xf.data_ptr(), n, k, packed.data_ptr(), *ptrs, lv.data_ptr(), blocksize, out_f,
                   y.data_ptr(), native.threads()):
        return None
    return y.to(x.dtype)


@kernel
def _decode_blocks(packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor, blocksize: int,
                   count: int) -> torch.Tensor:
    """:func:`dequantize_4bit` with its ``[256, 2]`` byte table: one fused loop when compiled."""
    vals = table.index_select(0, packed.to(torch.int32)).view(-1)[:count]  # (count,)
    nb = num_blocks(count, blocksize)
    if count % blocksize:
        vals = torch.nn.functional.pad(vals, (0, nb * blocksize - count))
    return vals.view(nb, blocksize).mul_(absmax[:nb, None]).view(-1)[:count]  # in place: one dense copy


@kernel
def gemv_4bit(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, table: torch.Tensor,
              blocksize: int) -> torch.Tensor:
    """``x [N, in]`` (float32 or float64) times the transpose of the 4-bit ``[out, in]`` weight whose row-major bytes are
    ``packed`` ``[out * in / 2]``, blocks of ``blocksize`` (dividing ``in``) scaled by ``absmax``: ``[N, out]``,
    accumulated in float32, without a dense weight (each block's dot product is scaled once)."""
    n, k = x.shape
    nb = k // blocksize
    v = table.index_select(0, packed.to(torch.int32)).view(1, -1, nb, blocksize)  # (1, out, nb, bs) levels
    part = (v.to(x.dtype) * x.view(n, 1, nb, blocksize)).sum(-1)  # (N, out, nb)
    return (part * absmax.view(1, -1, nb).to(x.dtype)).sum(-1)  # (N, out)
