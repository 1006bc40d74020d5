"""Hadamard matrices of order ``n = 2^k * K`` and their fast application to the last dim of a tensor.

The transform of size ``n`` is a Kronecker product of small factors: Sylvester matrices for the power of two
(split into factors of at most 32, so applying one is a few small GEMMs instead of a dense ``n x n`` one)
and one factor of order ``K`` for the rest:

- ``K = 1``: ``n`` is a power of two (Sylvester alone: 4096, and every kit shape);
- ``K = q + 1`` with ``q`` a prime ``= 3 (mod 4)``: Paley I (12, 20, 44, 60, 68, 84, 104, 108, 132, 140, ...);
- ``K = 2 (q + 1)`` with ``q`` a prime ``= 1 (mod 4)``: Paley II (28, 36, 76, 124, 148, 196, 204, ...);
- otherwise a seeded random orthogonal factor of order ``4 * odd(n)``, stored with the packed weight by
  the caller. For ``odd(n) <= 63`` that happens for 23, 29, 39, 43, 47, 59, 61: ``K`` = 92, 116, 156,
  172 (Llama-7B's 11008 = 64 * 172), 188, 236, 244, since no ``2^j * odd(n) <= 256`` has a Paley matrix
  from a prime (prime powers such as 25 or 343 are not implemented).

The smallest such ``K`` (at most 256) is used: the cheapest to apply. SmolLM2-135M needs 576 = 16 * 36
(Paley II, q = 17), 1536 = 128 * 12 (Paley I, q = 11) and 192 = 16 * 12. The Sylvester and Paley factors
have entries +-1; the transform is normalized by ``1 / sqrt(prod of their orders)`` to be orthogonal.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from modulora_core import InvalidWeightError, native

# larger powers of two are split (4096 = 16 x 16 x 16, 1536 = 16 x 8 x 12): a factor of order f costs f
# multiply-adds per element, and three passes of 16 beat two of 64 (measured: 2x faster for 4096)
MAX_SYLVESTER_FACTOR = 32
MAX_PALEY_ORDER = 256  # a dense K x K factor costs K multiply-adds per element; beyond this use a random one


def is_prime(q: int) -> bool:
    """Trial division; the orders here are small."""
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def quadratic_character(q: int) -> torch.Tensor:
    """``chi[x]`` for x in ``0..q-1`` (q prime): 0 at 0, +1 for nonzero squares mod q, -1 otherwise."""
    chi = -torch.ones(q, dtype=torch.float64, device="cpu")
    chi[0] = 0
    chi[torch.tensor(sorted({(x * x) % q for x in range(1, q)}), dtype=torch.long, device="cpu")] = 1
    return chi


def jacobsthal(q: int) -> torch.Tensor:
    """``[q, q]`` Jacobsthal matrix ``Q[i, j] = chi(j - i mod q)``: antisymmetric for q = 3 (mod 4),
    symmetric for q = 1 (mod 4)."""
    idx = torch.arange(q, device="cpu")
    return quadratic_character(q)[(idx[None, :] - idx[:, None]) % q]


def paley1(q: int) -> torch.Tensor:
    """``[q+1, q+1]`` Hadamard matrix (entries +-1) from a prime ``q = 3 (mod 4)``: ``I + S`` with the
    skew conference matrix ``S = [[0, 1^T], [-1, Q]]``."""
    if not (is_prime(q) and q % 4 == 3):
        raise InvalidWeightError(f"Paley I needs a prime q = 3 (mod 4), got q={q}")
    s = torch.zeros(q + 1, q + 1, dtype=torch.float64, device="cpu")
    s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jacobsthal(q)
    return s + torch.eye(q + 1, dtype=torch.float64, device="cpu")


def paley2(q: int) -> torch.Tensor:
    """``[2(q+1), 2(q+1)]`` Hadamard matrix from a prime ``q = 1 (mod 4)``: in the symmetric conference
    matrix ``C = [[0, 1^T], [1, Q]]`` each 0 becomes ``[[1, -1], [-1, -1]]`` and each +-1 becomes
    ``+-[[1, 1], [1, -1]]``."""
    if not (is_prime(q) and q % 4 == 1):
        raise InvalidWeightError(f"Paley II needs a prime q = 1 (mod 4), got q={q}")
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64, device="cpu")
    c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, jacobsthal(q)
    zero_blk = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64, device="cpu")
    one_blk = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64, device="cpu")
    eye = torch.eye(q + 1, dtype=torch.float64, device="cpu")
    return torch.kron(c, one_blk) + torch.kron(eye, zero_blk)  # C has zeros exactly on its diagonal


def sylvester(n: int) -> torch.Tensor:
    """``[n, n]`` Sylvester Hadamard matrix (entries +-1), n a power of two."""
    if n < 1 or n & (n - 1):
        raise InvalidWeightError(f"a Sylvester Hadamard matrix has a power-of-two order, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64, device="cpu")
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64, device="cpu")
    while h.shape[0] < n:
        h = torch.kron(base, h)
    return h


def paley_construction(k: int) -> str | None:
    """``"paley1(q=11)"`` / ``"paley2(q=17)"``: how a Hadamard matrix of order ``k`` is built, or None."""
    if k % 4:
        return None
    if is_prime(k - 1) and (k - 1) % 4 == 3:
        return f"paley1(q={k - 1})"
    if k % 2 == 0 and is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return f"paley2(q={k // 2 - 1})"
    return None


@functools.lru_cache(maxsize=64)
def paley(k: int) -> torch.Tensor:
    """``[k, k]`` Paley Hadamard matrix of order ``k`` (float64, +-1); error when none can be built."""
    how = paley_construction(k)
    if how is None:
        raise InvalidWeightError(f"no Paley construction gives a Hadamard matrix of order {k}")
    q = int(how.split("q=")[1].rstrip(")"))
    return paley1(q) if how.startswith("paley1") else paley2(q)


@dataclass(frozen=True)
class HadamardPlan:
    """How the orthogonal transform of size ``n`` is built: ``n = 2^k * K``.

    ``factors`` are the Kronecker factors' orders, outermost first; ``construction`` names the ``K``
    factor (``"sylvester"`` when K = 1, ``"paley1(q=..)"``, ``"paley2(q=..)"`` or ``"random-orthogonal"``).
    """

    n: int
    pow2: int
    k: int
    construction: str

    @property
    def random(self) -> bool:
        """True when the ``K`` factor is a random orthogonal matrix (stored with the weight)."""
        return self.construction == "random-orthogonal"

    @property
    def factors(self) -> tuple[int, ...]:
        e = self.pow2.bit_length() - 1
        parts = -(-e // (MAX_SYLVESTER_FACTOR.bit_length() - 1))  # as few factors as the cap allows ...
        sizes = [1 << (e // parts + (i < e % parts)) for i in range(parts)]  # ... and balanced: 64 x 64
        if self.k > 1:
            sizes.append(self.k)
        return tuple(sizes) or (1,)

    @property
    def norm(self) -> float:
        """``1 / sqrt(order of the +-1 part)``: the orthogonal transform is ``norm * kron(factors)``."""
        return 1.0 / math.sqrt(self.pow2 if self.random else self.n)


@functools.lru_cache(maxsize=256)
def plan(n: int) -> HadamardPlan:
    """The cheapest construction for size ``n``: Sylvester, else the smallest Paley ``K``, else random."""
    if n < 1:
        raise InvalidWeightError(f"a Hadamard transform needs a positive size, got {n}")
    e = (n & -n).bit_length() - 1
    odd = n >> e
    if odd == 1:
        return HadamardPlan(n, n, 1, "sylvester")
    for j in range(2, e + 1):
        if (odd << j) > MAX_PALEY_ORDER:
            break
        how = paley_construction(odd << j)
        if how is not None:
            return HadamardPlan(n, 1 << (e - j), odd << j, how)
    j = min(e, 2)  # a random factor of order 4 * odd, like a Hadamard order (11008 = 64 x 172)
    return HadamardPlan(n, 1 << (e - j), odd << j, "random-orthogonal")


def random_orthogonal(k: int, seed: int) -> torch.Tensor:
    """``[k, k]`` float32 orthogonal matrix, Haar-distributed from ``seed`` (QR of a Gaussian, sign-fixed)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(k, k, generator=g, dtype=torch.float64, device="cpu")
    q, r = torch.linalg.qr(a)
    return (q * torch.sign(torch.diagonal(r))[None, :]).to(torch.float32).contiguous()


def factor_matrices(p: HadamardPlan, rot: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The float64 Kronecker factors of plan ``p``; ``rot`` is the stored ``[K, K]`` random factor."""
    mats = [_sylvester_cached(f) for f in p.factors[: len(p.factors) - (p.k > 1)]]
    if p.k > 1:
        if p.random:
            if rot is None or tuple(rot.shape) != (p.k, p.k):
                raise InvalidWeightError(f"size {p.n} needs its stored [{p.k}, {p.k}] random orthogonal factor")
            mats.append(rot.to(torch.float64))
        else:
            mats.append(paley(p.k))
    return mats or [torch.ones(1, 1, dtype=torch.float64, device="cpu")]


@functools.lru_cache(maxsize=32)
def _sylvester_cached(n: int) -> torch.Tensor:
    return sylvester(n)


def factors_on(p: HadamardPlan, rot: torch.Tensor | None, dtype: torch.dtype,
               device: torch.device) -> list[torch.Tensor]:
    """:func:`factor_matrices` in ``dtype`` on ``device``; the fixed (Sylvester, Paley) factors are cached per
    (plan, dtype, device), so a call on a GPU copies nothing from the host. ``rot`` is stored with the weight,
    on its device already."""
    if p.random:
        return [f.to(dtype=dtype, device=device) for f in factor_matrices(p, rot)]
    return list(_fixed_factors_on(p, dtype, torch.device(device)))


@functools.lru_cache(maxsize=64)
def _fixed_factors_on(p: HadamardPlan, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(f.to(dtype=dtype, device=device) for f in factor_matrices(p))


def kron_apply(x: torch.Tensor, mats: list[torch.Tensor], transpose: bool = False) -> torch.Tensor:
    """``[..., n] -> [..., n]``: each row vector ``v`` becomes ``kron(mats) @ v`` (``kron(mats)^T @ v`` when
    ``transpose``), unnormalized. ``mats`` must already be in x's dtype and device."""
    sizes = [m.shape[0] for m in mats]
    lead = x.shape[:-1]
    n = x.shape[-1]
    if math.prod(sizes) != n:
        raise InvalidWeightError(f"Hadamard factors {sizes} do not multiply to the size {n}")
    y = x.reshape(-1, n)
    for j, m in enumerate(mats):
        if sizes[j] == 1:
            continue
        right = math.prod(sizes[j + 1:])
        f = m if transpose else m.T  # v -> F v is the row-vector product v @ F^T
        if right == 1:
            y = y.reshape(-1, sizes[j]) @ f  # (B*left, f_j): one GEMM
        else:
            y = torch.matmul(f.T, y.reshape(-1, sizes[j], right))  # (B*left, f_j, right): F acts on axis 1
    return y.reshape(*lead, n)


def hadamard_matrix(n: int, rot: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[n, n]`` orthogonal transform of size ``n`` (float64): for tests and small sizes."""
    p = plan(n)
    return kron_apply(torch.eye(n, dtype=torch.float64, device="cpu"), factor_matrices(p, rot)).T * p.norm


@functools.lru_cache(maxsize=8)
def _codebook_h8(device: torch.device) -> torch.Tensor:
    """``[65536, 8]`` float32: ``H_8`` times each E8P codeword (exact: multiples of 1/4, sums of 8)."""
    from .e8p import codebook_on  # lazy: e8p is the codebook's module, this one the transforms'

    return (codebook_on(device).double() @ sylvester(8).to(device)).float().contiguous()


def materialize_2bit_native(codes: torch.Tensor, rot_in: torch.Tensor | None, rot_out: torch.Tensor | None,
                            row_factor: torch.Tensor, col_factor: torch.Tensor) -> torch.Tensor | None:
    """``diag(row_factor) H_m^T C H_n diag(col_factor)`` as float32 ``[m, n]`` by the CPU kernel, or None where
    it cannot run. ``codes`` int16 ``[m, n / 8]`` are E8P codes (C, their codewords); the
    transforms are the unnormalized Kronecker products of :func:`plan` (``rot_*``: a side's stored random
    factor); ``row_factor`` ``[m]`` and ``col_factor`` ``[n]`` are float64 and carry the norms and the scale.
    One float32 pass per side (each row transformed in cache, then strips of columns), instead of float64
    GEMMs over the whole weight."""
    m, n = codes.shape[0], codes.shape[1] * 8
    p_in, p_out = plan(n), plan(m)
    f_in = factor_matrices(p_in, rot_in)[-1].to(torch.float32).contiguous() if p_in.k > 1 else None
    f_out = factor_matrices(p_out, rot_out)[-1].to(torch.float32).contiguous() if p_out.k > 1 else None
    facs = tuple(f for f in (f_in, f_out) if f is not None)
    from .e8p import codebook_on

    # a power-of-two n: the input side's three lowest levels come with the lookup (see native_quip.c)
    book = _codebook_h8(codes.device) if p_in.k == 1 else codebook_on(codes.device)
    so = native.lib(codes, book, row_factor, col_factor, *facs)
    if so is None or codes.dtype != torch.int16 or row_factor.dtype != torch.float64:
        return None
    w = native.empty((m, n))  # huge pages: a dense weight's page faults cost more than the kernel
    if so.quip2_materialize(codes.data_ptr(), book.data_ptr(), m, n, p_in.pow2, p_in.k, native.ptr(f_in), p_out.pow2,
                            p_out.k, native.ptr(f_out), row_factor.data_ptr(), col_factor.data_ptr(), w.data_ptr(),
                            native.threads()):
        return None
    return w
