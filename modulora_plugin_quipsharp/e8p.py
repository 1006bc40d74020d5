"""The E8P 2-bit codebook of QuIP#: 65,536 points of ``D8hat +- 1/4`` (8 weights per 16-bit code).

``D8hat`` is the set of half-integer 8-vectors with an even coordinate sum. The codebook is built from a
256-entry *source set* ``S`` of absolute-value patterns: the 227 patterns of ``D8hat`` points with squared
norm <= 10 in lexicographic order, then 29 patterns of squared norm 12 (five 3/2 and three 1/2). A code's
high byte indexes ``S``, its low byte holds 8 sign bits (coordinate ``i`` <-> bit ``SIGN_BIT[i]``, as in the
relaxml checkpoints). Decoding: take ``S[a]``, negate its last coordinate if its sum is odd; if the sign
bits have odd parity ``p``, toggle bit 0; negate the coordinates whose bit is set; add ``+1/4`` (``p``
even) or ``-1/4`` (``p`` odd).

So the codebook is exactly ``{z + t : z in D8hat, |z| in S, t = +-1/4}``, and the encoder finds, per
coset ``t``, the nearest such ``z`` to ``x - t``: first the nearest point of the whole lattice (round to
half-integers, fix the sum's parity at the worst-rounded coordinate: O(8)); only where its pattern is not in
``S`` (about a third of the vectors at QuIP#'s scale) and that coset could still be the closer one, a
search over the 256 patterns, each scored in closed form (best signs, then the cheapest flip that fixes
the parity).
"""

from __future__ import annotations

import functools
import itertools

import torch

from modulora_core import native

CPU = torch.device("cpu")
SIGN_BIT = (0, 4, 1, 5, 2, 6, 3, 7)  # coordinate i's sign lives in bit SIGN_BIT[i] of the low byte
# positions of the three 1/2 entries of the 29 squared-norm-12 patterns (the others are 3/2), in order
NORM12_HALVES = ("123", "023", "013", "012", "367", "357", "347", "356", "346", "345", "267", "257", "247",
                 "256", "246", "245", "167", "157", "147", "156", "146", "045", "067", "057", "047", "056",
                 "046", "014", "237")
NUM_CODES = 1 << 16
MAX_LEVEL = 4  # |z_i| - 1/2 in 0..3 keys a pattern in base 4; larger entries are never in S


# Every table is built once on the CPU and cached once per device (``device`` is part of the cache key),
# so the encoder and decoder run where the weight is without a host-to-device copy per call.
@functools.lru_cache(maxsize=8)
def source_set(device: torch.device = CPU) -> torch.Tensor:
    """``[256, 8]`` float32 absolute-value patterns ``S`` (entries 1/2, 3/2, 5/2), on ``device``."""
    if device != CPU:
        return source_set().to(device)
    levels = (0.5, 1.5, 2.5)
    small = sorted(p for p in itertools.product(levels, repeat=8) if sum(v * v for v in p) <= 10)
    big = [tuple(0.5 if str(i) in pos else 1.5 for i in range(8)) for pos in NORM12_HALVES]
    return torch.tensor(small + big, dtype=torch.float32, device=CPU)


@functools.lru_cache(maxsize=8)
def signed_source(device: torch.device = CPU) -> torch.Tensor:
    """``[256, 8]``: ``S`` with its last coordinate negated where its sum is odd (so each row is in D8hat)."""
    if device != CPU:
        return signed_source().to(device)
    s = source_set().clone()
    odd = s.sum(1).round().long() % 2 == 1
    s[odd, 7] = -s[odd, 7]
    return s


@functools.lru_cache(maxsize=8)
def _sign_shifts(device: torch.device) -> torch.Tensor:
    return torch.tensor(SIGN_BIT, dtype=torch.long, device=device)


def _sign_vectors(bits: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` of +-1 from 8-bit sign bytes ``bits`` via ``SIGN_BIT``."""
    shifts = _sign_shifts(bits.device)
    return 1.0 - 2.0 * ((bits[..., None] >> shifts) & 1).to(torch.float32)


@functools.lru_cache(maxsize=1)
def codebook() -> torch.Tensor:
    """``[65536, 8]`` float32 codewords, row ``c`` = the decoding of 16-bit code ``c``."""
    code = torch.arange(NUM_CODES, dtype=torch.long, device=CPU)
    idx, bits = code >> 8, code & 0xFF
    parity = torch.zeros_like(bits)
    for b in range(8):
        parity ^= (bits >> b) & 1
    signs = _sign_vectors(bits ^ parity)  # odd parity: bit 0 toggled, so the flips are even in number
    shift = 0.25 - 0.5 * parity.to(torch.float32)  # +1/4 for even parity, -1/4 for odd
    return (signed_source()[idx] * signs + shift[:, None]).contiguous()


@functools.lru_cache(maxsize=8)
def _pattern_table(device: torch.device = CPU) -> torch.Tensor:
    """``[4^8]`` long: index into ``S`` of the pattern with levels ``l_i = |z_i| - 1/2`` keyed base 4, or -1."""
    if device != CPU:
        return _pattern_table().to(device)
    table = torch.full((MAX_LEVEL**8,), -1, dtype=torch.long, device=CPU)
    table[_pattern_key(source_set())] = torch.arange(256, device=CPU)
    return table


@functools.lru_cache(maxsize=8)
def _key_weights(device: torch.device) -> torch.Tensor:
    return torch.tensor([MAX_LEVEL**i for i in range(8)], dtype=torch.long, device=device)


def _pattern_key(absz: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` half-integer magnitudes -> ``[...]`` base-4 key (levels clamped; check them first)."""
    lv = (absz - 0.5).round().long().clamp_(0, MAX_LEVEL - 1)
    return (lv * _key_weights(absz.device)).sum(-1)


def nearest_d8hat(y: torch.Tensor) -> torch.Tensor:
    """``[N, 8] -> [N, 8]``: the nearest point of D8hat (half-integers, even sum) to each row."""
    fl = torch.floor(y)
    z = fl + 0.5
    err = y - z  # in [-1/2, 1/2)
    odd = fl.sum(-1).remainder(2) != 0  # sum(z) = sum(floor) + 4
    worst = err.abs().argmax(-1, keepdim=True)  # (N, 1): the coordinate whose other rounding costs least
    step = torch.where(err.gather(1, worst) >= 0, 1.0, -1.0) * odd[:, None]  # (N, 1); 0 where even
    return z.scatter_add_(1, worst, step)


@functools.lru_cache(maxsize=8)
def _pattern_stats(device: torch.device = CPU) -> tuple[torch.Tensor, torch.Tensor]:
    """Per pattern of S: the parity of its coordinate sum (long 0/1) and its squared norm."""
    s = source_set(device)
    return s.sum(-1).round().long() % 2, (s * s).sum(-1)


def nearest_in_s(y: torch.Tensor) -> torch.Tensor:
    """``[N, 8] -> [N, 8]``: the nearest ``z`` in D8hat with ``|z|`` in ``S`` (an exact search).

    For a pattern ``a`` the best signs follow ``y``'s, scoring ``2 <|y|, a> - |a|^2`` (a GEMM against all
    256 patterns); D8hat needs the number of minus signs to match the parity of ``sum(a)``, else the
    cheapest coordinate flips, costing ``4 min_i a_i |y_i|``. So the best right-parity pattern is exact at
    once, and only the wrong-parity patterns scoring above it (about one per vector) are rescored.
    """
    n = y.shape[0]
    s = source_set(y.device)
    parity, norms = _pattern_stats(y.device)
    ay = y.abs()
    bound = 2 * ay @ s.T - norms  # (N, 256): exact where the parity is right, an upper bound elsewhere
    wrong = ((y < 0).sum(-1, keepdim=True) % 2) != parity  # (N, 256)
    best, pat = bound.masked_fill(wrong, -torch.inf).max(-1)  # (N,)
    flip = torch.full((n,), -1, dtype=torch.long, device=y.device)
    r, j = (bound.masked_fill(~wrong, -torch.inf) > best[:, None]).nonzero(as_tuple=True)  # (P,) pairs
    if r.numel():
        cheap, where = (s[j] * ay[r]).min(-1)  # (P,): the flip that fixes the parity
        score = bound[r, j] - 4 * cheap
        row_best = torch.full((n,), -torch.inf, device=y.device).scatter_reduce(0, r, score, "amax")
        win = (score >= row_best[r]) & (score > best[r])
        pat[r[win]], flip[r[win]] = j[win], where[win]
    signs = torch.where(y < 0, -1.0, 1.0)
    rows = (flip >= 0).nonzero().squeeze(1)
    signs[rows, flip[rows]] *= -1
    return s[pat] * signs


def in_source_set(z: torch.Tensor) -> torch.Tensor:
    """``[..., 8]`` D8hat points -> ``[...]`` bool: is ``|z|`` one of the 256 patterns of S?"""
    absz = z.abs()
    return (absz.amax(-1) < MAX_LEVEL) & (_pattern_table(z.device)[_pattern_key(absz)] >= 0)


def encode(x: torch.Tensor) -> torch.Tensor:
    """``[N, 8]`` float -> ``[N]`` long codes in ``0..65535`` of the nearest E8P codewords."""
    x = x.to(torch.float32)
    n = x.shape[0]
    shifts = torch.tensor([0.25, -0.25], device=x.device)
    ys = (x[None] - shifts[:, None, None]).reshape(2 * n, 8)  # both cosets' targets, stacked
    zs = nearest_d8hat(ys)
    dist = (ys - zs).square().sum(-1)  # (2N,): a lower bound of each coset's distance ...
    exact = in_source_set(zs)  # ... and the distance itself where the lattice point is a codeword
    rows = torch.arange(n, device=x.device)
    for _ in range(2):  # search the closer coset where needed; then the other one if it could still win
        pick = (dist[n:] < dist[:n]).long() * n + rows  # (N,): index of the closer coset's entry
        todo = pick[~exact[pick]]
        if not todo.numel():
            break
        z = nearest_in_s(ys[todo])
        zs[todo], dist[todo], exact[todo] = z, (ys[todo] - z).square().sum(-1), True
    second = dist[n:] < dist[:n]
    return _codes_of(zs[second.long() * n + rows], torch.where(second, -0.25, 0.25))


def _codes_of(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Codes of codewords ``z + t`` (``z`` in D8hat with ``|z|`` in S, ``t`` = +-1/4)."""
    idx = _pattern_table(z.device)[_pattern_key(z.abs())]  # (N,)
    neg = (z * signed_source(z.device)[idx]) < 0  # (N, 8): flips relative to the signed source row
    shifts = _sign_shifts(z.device)
    bits = (neg.long() << shifts).sum(-1)  # even parity by construction
    bits = bits ^ (t < 0).long()  # a -1/4 codeword has odd parity: its bit 0 was toggled on decoding
    return (idx << 8) | bits


def decode(codes: torch.Tensor) -> torch.Tensor:
    """``[...]`` codes (any integer dtype; int16 read as unsigned) -> ``[..., 8]`` float32 codewords, on the
    codes' device."""
    flat = codes.reshape(-1).to(torch.int32) & 0xFFFF
    # index_select, not advanced indexing: the row gather is ~5x faster and dominates the fast path
    return codebook_on(codes.device).index_select(0, flat).view(*codes.shape, 8)


@functools.lru_cache(maxsize=8)
def codebook_on(device: torch.device) -> torch.Tensor:
    """:func:`codebook` on ``device`` (one copy per device)."""
    return codebook().to(device)


def to_int16(codes: torch.Tensor) -> torch.Tensor:
    """``0..65535`` long codes -> int16 storage (the same 16 bits)."""
    return (codes - ((codes >> 15) << 16)).to(torch.int16)


def gemv_native(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
    """``x [N, 8B]`` float32 times the decoded codes ``[m, B]`` transposed: ``[N, m]``, by the CPU kernel (each
    code's codeword read from the float32 codebook and dotted with its 8 inputs: no decoded weight), or None
    where it cannot run."""
    book = codebook_on(CPU)
    xc = x.contiguous()
    so = native.lib(xc, codes, book)
    if so is None or x.dtype != torch.float32 or codes.dtype != torch.int16 or x.shape[0] > native.MAX_ROWS:
        return None
    y = xc.new_empty(x.shape[0], codes.shape[0])
    so.e8p_gemv(xc.data_ptr(), x.shape[0], x.shape[1], codes.data_ptr(), book.data_ptr(), codes.shape[0],
                y.data_ptr(), native.threads())
    return y
