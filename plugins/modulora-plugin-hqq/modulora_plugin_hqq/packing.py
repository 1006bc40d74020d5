"""Reading hqq's bit-packed codes a block of groups at a time, without unpacking the whole weight.

hqq (``hqq.core.bitpack.BitPack``) packs a ``[N, g]`` code matrix (one row per group when ``axis=1``) along
dim 0: the rows are cut into ``k`` equal slabs of ``step = N / k`` rows (``k`` codes per word), and packed
row ``j`` holds the codes of rows ``j, j + step, ..., j + (k-1)·step``, slab ``s`` at bit ``bits·(k-1-s)``.
3-bit pads ``N`` up to a multiple of 10 and packs 10 codes per int32; the others pack into uint8.

So group ``r`` sits in packed row ``r % step``, slab ``r // step``: a contiguous range of groups is at most
``k`` contiguous row ranges of the packed tensor, one per slab it touches. That is what makes row blocks of
the weight cheap to materialize.
"""

from __future__ import annotations

import torch

# codes per packed word, and the hqq packing name, for each supported bit width
CODES_PER_WORD = {1: 8, 2: 4, 3: 10, 4: 2, 8: 1}
PACKING = {1: "1bit_u8", 2: "2bit_u8", 3: "3bit_32", 4: "4bit_u8", 8: "8bit_u8"}


def packed_rows(n_groups: int, bits: int) -> int:
    """Rows of hqq's packed tensor for ``n_groups`` rows of codes (3-bit pads to a multiple of 10)."""
    k = CODES_PER_WORD[bits]
    return -(-n_groups // k) if bits == 3 else n_groups // k


def read_codes(w_q: torch.Tensor, bits: int, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
    """Codes of code-matrix rows ``[start, stop)`` of hqq's packed ``w_q`` ``[step, g]``: ``[stop-start, g]``.

    Equal, value for value, to ``BitPack.unpack_<bits>(w_q, dtype)[start:stop]``, but reads only the packed
    rows that hold those codes.
    """
    step, k = w_q.shape[0], CODES_PER_WORD[bits]
    if stop <= start:
        return torch.empty((0, w_q.shape[1]), dtype=dtype, device=w_q.device)
    if k == 1:
        return w_q[start:stop].to(dtype)
    mask = (1 << bits) - 1
    parts = []
    for slab in range(start // step, (stop - 1) // step + 1):
        lo, hi = max(start, slab * step), min(stop, (slab + 1) * step)
        rows = w_q[lo - slab * step: hi - slab * step]  # (hi - lo, g) packed words
        # bits above 30 are never set (3-bit: 10 x 3 bits), so the int32 shift is never sign-extended
        parts.append((rows >> (bits * (k - 1 - slab))) & mask)
    codes = parts[0] if len(parts) == 1 else torch.cat(parts)
    return codes.to(dtype)
