"""Residual vector quantization on top of E8P: 3 bits (E8P + a 1-bit E8 residual) and 4 bits (E8P + E8P).

An 8-vector ``x`` becomes ``q1 = E8P(x)`` and then ``q2 = C2(r (x - q1)) / r`` for the residual, with
``r = 2.04`` for the 256-point E8 codebook and ``r = 3.45`` for a second E8P stage. Every codeword is a
multiple of 1/4, so ``4 q`` is an integer vector: :func:`integer_sum` combines the stages exactly in
integers (``r = num / den`` is rational), which lets :mod:`.quantizer` rotate them back without rounding.
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from . import e8p

# residual scale r = num / den per total bit width; 2 bits has no residual stage
RESIDUAL_SCALE = {3: (204, 100), 4: (345, 100)}
STAGE_BITS = {2: (16,), 3: (16, 8), 4: (16, 16)}  # bits per 8 weights of each stage's code


@functools.lru_cache(maxsize=8)
def e8_1bit_codebook(device: torch.device = e8p.CPU) -> torch.Tensor:
    """``[256, 8]`` float32: the 241 E8 points of squared norm <= 2 (0 and the 240 roots) and 15 of the 16
    ``+-2 e_i`` (``-2 e_7`` left out). Order: by squared norm, then lexicographic."""
    pts = {(0.0,) * 8}
    for i, j in itertools.combinations(range(8), 2):  # the 112 integer roots +-e_i +-e_j
        for si, sj in itertools.product((1.0, -1.0), repeat=2):
            v = [0.0] * 8
            v[i], v[j] = si, sj
            pts.add(tuple(v))
    for signs in itertools.product((0.5, -0.5), repeat=8):  # the 128 half-integer roots: even # of minus
        if sum(s < 0 for s in signs) % 2 == 0:
            pts.add(signs)
    for i in range(8):
        for s in (2.0, -2.0):
            if (i, s) != (7, -2.0):
                v = [0.0] * 8
                v[i] = s
                pts.add(tuple(v))
    book = torch.tensor(sorted(pts, key=lambda p: (sum(v * v for v in p), p)), dtype=torch.float32, device="cpu")
    return book.to(device)  # cached per device


def e8_1bit_encode(x: torch.Tensor) -> torch.Tensor:
    """``[N, 8]`` -> ``[N]`` long indices of the nearest points of :func:`e8_1bit_codebook` (brute force)."""
    cb = e8_1bit_codebook(x.device)
    score = 2 * x.to(torch.float32) @ cb.T - (cb * cb).sum(-1)  # (N, 256): -|x - c|^2 + |x|^2
    return score.argmax(-1)


def e8_1bit_decode(idx: torch.Tensor) -> torch.Tensor:
    """``[...]`` indices (any integer dtype, uint8 included) -> ``[..., 8]`` float32 points."""
    book = e8_1bit_codebook(idx.device)
    return book.index_select(0, idx.reshape(-1).to(torch.int32)).view(*idx.shape, 8)


@dataclass(frozen=True)
class StageCodes:
    """The codes of one block of 8-vectors: ``first`` E8P codes and, above 2 bits, ``second`` residual codes."""

    first: torch.Tensor  # (N,) long, 0..65535
    second: torch.Tensor | None  # (N,) long: 0..255 (3 bits) or 0..65535 (4 bits)


def quantize(x: torch.Tensor, bits: int) -> tuple[StageCodes, torch.Tensor]:
    """``[N, 8]`` (already divided by the weight scale) -> codes and the ``[N, 8]`` float32 reconstruction."""
    q1 = e8p.decode(c1 := e8p.encode(x))
    if bits == 2:
        return StageCodes(c1, None), q1
    num, den = RESIDUAL_SCALE[bits]
    r = num / den
    resid = (x - q1) * r
    if bits == 3:
        c2 = e8_1bit_encode(resid)
        q2 = e8_1bit_decode(c2)
    else:
        c2 = e8p.encode(resid)
        q2 = e8p.decode(c2)
    return StageCodes(c1, c2), q1 + q2 / r


def decode(first: torch.Tensor, second: torch.Tensor | None, bits: int,
           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored codes ``[...]`` -> ``[..., 8]`` reconstruction (in units of the weight scale) in ``dtype``."""
    q = e8p.decode(first).to(dtype)
    if bits == 2:
        return q
    num, den = RESIDUAL_SCALE[bits]
    q2 = (e8_1bit_decode(second) if bits == 3 else e8p.decode(second)).to(dtype)
    return q.add_(q2, alpha=den / num)  # q is a fresh gather: in place, one pass


def integer_sum(first: torch.Tensor, second: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, float]:
    """Exact form of :func:`decode`: ``(k [..., 8] float64 with integer values, divisor)`` such that the
    reconstruction is ``k / divisor``. Integer-valued float64 keeps later +-1 transforms exact."""
    k = e8p.decode(first).to(torch.float64) * 4  # E8P entries are multiples of 1/4
    if bits == 2:
        return k, 4.0
    num, den = RESIDUAL_SCALE[bits]
    q2 = e8_1bit_decode(second) if bits == 3 else e8p.decode(second)  # multiples of 1/2 and 1/4
    return k * num + q2.to(torch.float64) * (4 * den), 4.0 * num
