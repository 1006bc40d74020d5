"""GPTQ v1 bit packing: k-bit codes in int32 words, and the ``zero - 1`` convention of ``qzeros``.

A packed dimension is one little-endian bit stream cut into int32 words: value ``k`` occupies bits
``bits * k .. bits * k + bits - 1`` of the stream. For 2, 4 and 8 bits no value crosses a word; for 3 bits
32 values fill 3 words and values 10 and 21 straddle word boundaries. A length that does not fill the last
word is padded with zero bits (``ceil(n * bits / 32)`` words).

``qzeros`` of the v1 format hold ``zero - 1``. GPTQModel converts between v1 and its internal v2 (the zero
itself) by adding or subtracting the constant with a 1 in every field to whole words for 2/4/8 bits (so a
zero of 0 borrows from its neighbour, and the inverse carries it back exactly), and field by field, modulo
``2^bits``, for 3 bits. We do the same, so our bytes and our dequantized weights equal theirs.
"""

from __future__ import annotations

import torch

WORD_BITS = 32
BITS = (2, 3, 4, 8)
_MASK32 = (1 << 32) - 1


def packed_len(n: int, bits: int) -> int:
    """int32 words that hold ``n`` values of ``bits`` bits."""
    return -(-n * bits // WORD_BITS)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit words -> the int32 with the same bits."""
    words = words & _MASK32
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[n, C]`` integer codes in ``[0, 2^bits)`` -> ``[packed_len(n, bits), C]`` int32, packed along dim 0."""
    n, cols = values.shape
    chunks = -(-n // WORD_BITS)  # 32 values fill exactly `bits` words
    v = torch.zeros(chunks * WORD_BITS, cols, dtype=torch.int64, device=values.device)
    v[:n] = values.to(torch.int64) & ((1 << bits) - 1)
    v = v.view(chunks, WORD_BITS, cols)  # (chunks, 32, C)
    words = torch.zeros(chunks, bits, cols, dtype=torch.int64, device=values.device)
    for j in range(WORD_BITS):
        k, s = divmod(bits * j, WORD_BITS)
        words[:, k] |= v[:, j] << s
        if s + bits > WORD_BITS:  # the high bits spill into the next word
            words[:, k + 1] |= v[:, j] >> (WORD_BITS - s)
    return _to_int32(words.view(chunks * bits, cols)[: packed_len(n, bits)])


def unpack_rows(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_rows`: ``[W, C]`` int32 -> ``[n, C]`` uint8 codes (``n <= W * 32 / bits``)."""
    cols = words.shape[1]
    mask = (1 << bits) - 1
    if WORD_BITS % bits == 0:  # 2/4/8 bits: every word holds whole values; one broadcast shift
        per = WORD_BITS // bits
        shifts = torch.arange(0, WORD_BITS, bits, dtype=torch.int32, device=words.device)
        # arithmetic shift sign-extends int32, the mask drops those bits again
        vals = (words[:, None, :] >> shifts[None, :, None]) & mask  # (W, per, C)
        return vals.reshape(words.shape[0] * per, cols)[:n].to(torch.uint8)
    chunks = -(-words.shape[0] // bits)
    w = torch.zeros(chunks * bits, cols, dtype=torch.int64, device=words.device)
    w[: words.shape[0]] = words.to(torch.int64) & _MASK32
    w = w.view(chunks, bits, cols)  # (chunks, bits, C)
    out = torch.empty(chunks, WORD_BITS, cols, dtype=torch.uint8, device=words.device)
    for j in range(WORD_BITS):
        k, s = divmod(bits * j, WORD_BITS)
        v = w[:, k] >> s
        if s + bits > WORD_BITS:
            v = v | (w[:, k + 1] << (WORD_BITS - s))
        out[:, j] = (v & mask).to(torch.uint8)
    return out.view(chunks * WORD_BITS, cols)[:n]


def pack_cols(values: torch.Tensor, bits: int) -> torch.Tensor:
    """``[R, n]`` codes -> ``[R, packed_len(n, bits)]`` int32, packed along dim 1 (``qzeros``)."""
    return pack_rows(values.T, bits).T.contiguous()


def unpack_cols(words: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_cols`: ``[R, W]`` int32 -> ``[R, n]`` uint8."""
    return unpack_rows(words.T, bits, n).T


def _field_ones(bits: int) -> int:
    """The 32-bit word with a 1 in the lowest bit of every ``bits``-wide field (2/4/8 bits)."""
    return sum(1 << s for s in range(0, WORD_BITS, bits))


def zeros_v2_to_v1(zeros: torch.Tensor, bits: int) -> torch.Tensor:
    """Zero points ``[G, N]`` (0..2^bits-1) -> v1 ``qzeros`` ``[G, packed_len(N, bits)]`` int32 (``zero - 1``)."""
    if WORD_BITS % bits == 0:
        words = pack_cols(zeros, bits).to(torch.int64) & _MASK32
        return _to_int32(words - _field_ones(bits))  # whole-word subtract, as GPTQModel writes v1
    return pack_cols((zeros.to(torch.int64) - 1) & ((1 << bits) - 1), bits)


def zeros_v1_to_v2(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """v1 ``qzeros`` ``[G, W]`` -> zero points ``[G, n]`` uint8, the inverse of :func:`zeros_v2_to_v1`."""
    if WORD_BITS % bits == 0:
        words = _to_int32((qzeros.to(torch.int64) & _MASK32) + _field_ones(bits))
        return unpack_cols(words, bits, n)
    return ((unpack_cols(qzeros, bits, n).to(torch.int64) + 1) & ((1 << bits) - 1)).to(torch.uint8)


def zeros_v1_cols(qzeros: torch.Tensor, bits: int, n: int, a: int, b: int) -> torch.Tensor:
    """Zero points of output columns ``a:b`` only, ``[G, b - a]``, decoding the words that hold them.

    Columns are cut at multiples of 32 values (``bits`` whole words), where every format's fields align.
    """
    first = a // WORD_BITS
    last = min(-(-b // WORD_BITS), -(-n // WORD_BITS))
    words = qzeros[:, first * bits: last * bits]
    z = zeros_v1_to_v2(words, bits, words.shape[1] * WORD_BITS // bits)
    return z[:, a - first * WORD_BITS: b - first * WORD_BITS]
