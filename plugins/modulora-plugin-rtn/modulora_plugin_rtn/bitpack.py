"""Pack k-bit integer codes (k = 1..8) into bytes, row by row, so a block of rows unpacks on its own.

Eight consecutive codes of a row fill exactly k bytes (8·k bits), little-endian: code j of a group sits
at bits k·j .. k·j+k-1 of the group's k-byte word.
"""

from __future__ import annotations

import torch


def packed_cols(in_features: int, bits: int) -> int:
    """Bytes per row for ``in_features`` codes of ``bits`` bits (rows padded to a multiple of 8 codes)."""
    return (in_features + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """``[rows, n]`` integer codes in ``[0, 2^bits)`` -> ``[rows, packed_cols(n, bits)]`` uint8."""
    rows, n = codes.shape
    pad = (-n) % 8
    c = torch.nn.functional.pad(codes.to(torch.int64), (0, pad)).view(rows, -1, 8)  # (rows, G, 8)
    word = (c << (bits * torch.arange(8, device=c.device))).sum(-1)  # (rows, G): 8*bits-bit words
    out = (word[..., None] >> (8 * torch.arange(bits, device=c.device))) & 0xFF  # (rows, G, bits)
    return out.to(torch.uint8).reshape(rows, -1)


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: ``[rows, packed_cols]`` uint8 -> ``[rows, n]`` uint8 codes."""
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    if bits == 4:  # two codes per byte, low nibble first: one shift, no word assembly
        out = torch.stack((packed & 0xF, packed >> 4), dim=-1).view(rows, -1)
        return out[:, :n]
    if bits == 2:
        sh = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
        return ((packed[..., None] >> sh) & 0x3).view(rows, -1)[:, :n]
    if bits == 1:
        sh = torch.arange(8, dtype=torch.uint8, device=packed.device)
        return ((packed[..., None] >> sh) & 0x1).view(rows, -1)[:, :n]
    # odd widths (3, 5, 6, 7): assemble each group's bits-byte word, then cut it into 8 codes
    dt = torch.int32 if bits <= 3 else torch.int64
    b = packed.view(rows, -1, bits).to(dt)  # (rows, G, bits)
    word = b[..., 0]
    for i in range(1, bits):
        word = word | (b[..., i] << (8 * i))
    sh = (bits * torch.arange(8, device=packed.device)).to(dt)
    codes = (word[..., None] >> sh) & ((1 << bits) - 1)  # (rows, G, 8)
    return codes.to(torch.uint8).view(rows, -1)[:, :n]
