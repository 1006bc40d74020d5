"""QuIP#'s building blocks on their own: Hadamard constructions, the E8P and E8 codebooks, the E8P encoder
against brute force, and the block LDL behind BlockLDLQ."""

from __future__ import annotations

import pytest
import torch

from modulora_core import InvalidWeightError
from modulora_core.testing import synthetic_hessian
from modulora_plugin_quipsharp import e8p, hadamard, ldlq, rvq
from modulora_plugin_quipsharp.incoherence import Incoherence, pack_signs, unpack_signs


# -- Hadamard -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "how"), [(12, "paley1(q=11)"), (20, "paley1(q=19)"), (28, "paley2(q=13)"),
                                        (36, "paley2(q=17)"), (60, "paley1(q=59)"), (108, "paley1(q=107)"),
                                        (124, "paley2(q=61)"), (140, "paley1(q=139)")])
def test_paley_matrices_are_hadamard(k, how):
    assert hadamard.paley_construction(k) == how
    h = hadamard.paley(k)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, k * torch.eye(k, dtype=torch.float64))  # integer arithmetic: exact


@pytest.mark.parametrize(("n", "pow2", "k", "how"), [
    (576, 16, 36, "paley2(q=17)"),  # SmolLM2 hidden size
    (1536, 128, 12, "paley1(q=11)"),  # SmolLM2 MLP size
    (192, 16, 12, "paley1(q=11)"),  # SmolLM2 k/v projections
    (4096, 4096, 1, "sylvester"),  # Llama-7B hidden size
    (11008, 64, 172, "random-orthogonal"),  # Llama-7B MLP: no Paley matrix of order 172 (or 344, ...)
])
def test_plans_for_llm_sizes(n, pow2, k, how):
    p = hadamard.plan(n)
    assert (p.pow2, p.k, p.construction) == (pow2, k, how)
    assert p.pow2 * p.k == n and max(p.factors) <= max(hadamard.MAX_SYLVESTER_FACTOR, p.k)


@pytest.mark.parametrize("n", [16, 24, 192, 576, 1536])
def test_hadamard_transform_is_exactly_n_times_orthogonal(n):
    p = hadamard.plan(n)
    h = hadamard.kron_apply(torch.eye(n, dtype=torch.float64), hadamard.factor_matrices(p)).T  # unnormalized
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_random_factor_is_orthogonal_and_transforms_invert():
    n = 8 * 43  # odd part 43: no Paley order 4 * 43 or 8 * 43 from a prime
    p = hadamard.plan(n)
    assert p.random and p.k == 172
    inc = Incoherence.draw(16, n, seed=3)
    assert inc.rot_in is not None and inc.rot_out is None
    h = hadamard.hadamard_matrix(n, inc.rot_in)
    assert torch.allclose(h @ h.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    x = torch.randn(5, n, dtype=torch.float64)
    assert torch.allclose(inc.backward(inc.forward(x, "in"), "in"), x, atol=1e-6)


def test_kron_apply_matches_dense_product():
    n = 576
    x = torch.randn(3, 2, n, dtype=torch.float64)
    h = hadamard.hadamard_matrix(n)
    mats = hadamard.factor_matrices(hadamard.plan(n))
    norm = hadamard.plan(n).norm
    assert torch.allclose(hadamard.kron_apply(x, mats) * norm, x @ h.T, atol=1e-12)
    assert torch.allclose(hadamard.kron_apply(x, mats, transpose=True) * norm, x @ h, atol=1e-12)


def test_sign_packing_round_trip():
    s = Incoherence.draw(8, 64, seed=0).su
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    packed = pack_signs(s)
    assert packed.dtype == torch.uint8 and packed.shape == (8,)
    assert torch.equal(unpack_signs(packed), s)


def test_bad_sizes_are_refused():
    with pytest.raises(InvalidWeightError, match="power-of-two"):
        hadamard.sylvester(12)
    with pytest.raises(InvalidWeightError, match="Paley I needs"):
        hadamard.paley1(13)
    with pytest.raises(InvalidWeightError, match="random orthogonal factor"):
        hadamard.factor_matrices(hadamard.plan(8 * 43))


# -- E8P ----------------------------------------------------------------------------------------------------
def test_source_set_layout():
    s = e8p.source_set()
    norms = (s * s).sum(1)
    assert s.shape == (256, 8)
    assert bool((norms[:227] <= 10).all()) and bool((norms[227:] == 12).all())
    assert s[0].tolist() == [0.5] * 8 and s[227].tolist() == [1.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5, 1.5]
    assert [tuple(r) for r in s[:227].tolist()] == sorted(tuple(r) for r in s[:227].tolist())
    assert len({tuple(r) for r in s.tolist()}) == 256


def _in_d8hat(z: torch.Tensor) -> torch.Tensor:
    half = (z - 0.5 == torch.round(z - 0.5)).all(-1)
    return half & (z.sum(-1).round().long() % 2 == 0)


def test_codebook_has_65536_distinct_points_of_d8hat_shifted():
    cb = e8p.codebook()
    assert cb.shape == (65536, 8)
    assert torch.unique(cb, dim=0).shape[0] == 65536
    assert bool((_in_d8hat(cb - 0.25) | _in_d8hat(cb + 0.25)).all())
    assert float(cb.abs().max()) == 2.75
    # the definition, for one code by hand: pattern 0 (all 1/2, even sum), sign bits 0b00000011 (even
    # parity: +1/4), bit 1 is coordinate 2's sign
    assert e8p.decode(torch.tensor(3)).tolist() == [-0.25, 0.75, -0.25, 0.75, 0.75, 0.75, 0.75, 0.75]


def test_decode_of_encode_is_the_codeword_itself():
    codes = torch.randint(0, 65536, (4000,), generator=torch.Generator().manual_seed(0))
    assert torch.equal(e8p.encode(e8p.decode(codes)), codes)
    assert torch.equal(e8p.decode(e8p.to_int16(codes)), e8p.decode(codes))


@pytest.mark.parametrize("scale", [1.03, 2.5])  # QuIP#'s RMS, and far outside the codebook's range
def test_encoder_finds_the_nearest_codeword(scale):
    x = torch.randn(800, 8, generator=torch.Generator().manual_seed(1)) * scale
    got = e8p.decode(e8p.encode(x))
    brute = e8p.codebook()[torch.cdist(x, e8p.codebook()).argmin(1)]
    assert torch.allclose((x - got).square().sum(1), (x - brute).square().sum(1), atol=1e-5)


def test_nearest_d8hat_is_the_lattice_decoder():
    y = torch.randn(500, 8, generator=torch.Generator().manual_seed(2)) * 2
    z = e8p.nearest_d8hat(y)
    assert bool(_in_d8hat(z).all())
    # no lattice point nearer: compare with the nearest of all D8hat points within reach (z +- unit moves
    # that keep the parity are 2-coordinate moves; checking them all is a local optimality certificate)
    d = (y - z).square().sum(1)
    for i in range(8):
        for j in range(i + 1, 8):
            for si in (1.0, -1.0):
                for sj in (1.0, -1.0):
                    z2 = z.clone()
                    z2[:, i] += si
                    z2[:, j] += sj
                    assert bool(((y - z2).square().sum(1) >= d - 1e-6).all())


# -- residual codebooks -------------------------------------------------------------------------------------
def test_e8_1bit_codebook():
    cb = rvq.e8_1bit_codebook()
    assert cb.shape == (256, 8) and torch.unique(cb, dim=0).shape[0] == 256
    norms = (cb * cb).sum(1)
    assert int((norms == 0).sum()) == 1 and int((norms == 2).sum()) == 240 and int((norms == 4).sum()) == 15
    integer = (cb == cb.round()).all(1)
    half = ((cb - 0.5) == (cb - 0.5).round()).all(1)
    assert bool((integer | half).all()) and bool((cb.sum(1).round() % 2 == 0).all())  # all in E8
    x = torch.randn(300, 8)
    assert torch.equal(rvq.e8_1bit_encode(x), torch.cdist(x, cb).argmin(1))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_rvq_decode_and_integer_form_agree(bits):
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(bits))
    codes, recon = rvq.quantize(x, bits)
    assert torch.allclose(rvq.decode(codes.first, codes.second, bits), recon, atol=1e-6)
    k, div = rvq.integer_sum(codes.first, codes.second, bits)
    assert torch.equal(k, k.round()) and torch.allclose((k / div).float(), recon, atol=1e-6)
    rel = float((x - recon).norm() / x.norm())
    assert rel < {2: 0.33, 3: 0.19, 4: 0.11}[bits]  # each stage cuts the error


# -- block LDL ----------------------------------------------------------------------------------------------
def test_block_ldl_factorization():
    h = synthetic_hessian(64, 0).double()
    u = ldlq.block_ldl(h)
    eye = torch.eye(64, dtype=torch.float64)
    inv = torch.linalg.inv(eye + u)
    d = inv @ h @ inv.T
    blocks = torch.block_diag(*[torch.ones(8, 8)] * 8).bool()
    assert float(d[~blocks].abs().max()) < 1e-10  # D is block-diagonal
    assert float(torch.tril(u).abs().max()) == 0 and float(u[blocks].abs().max()) == 0  # strictly block-upper


def test_block_ldlq_lowers_the_proxy_loss():
    torch.manual_seed(0)
    n = 64
    x = torch.randn(4 * n, n) @ (torch.eye(n) + 0.6 * torch.randn(n, n) / n**0.5)
    h = (x.T @ x / x.shape[0]).double()
    w = torch.randn(48, n)

    def proxy(q):
        e = (q - w).double()
        return float(torch.trace(e @ h @ e.T))

    def round_block(b):
        return rvq.quantize(b, 2)[1]

    plain = ldlq.block_ldlq(w, None, round_block)
    fed = ldlq.block_ldlq(w, ldlq.block_ldl(ldlq.damp_hessian(h, 0.01)), round_block)
    assert proxy(fed) < 0.8 * proxy(plain)


def test_hessian_that_is_not_positive_definite_is_refused():
    h = -torch.eye(16, dtype=torch.float64)
    h[0, 0] = 40.0  # positive mean diagonal, indefinite even after dampening
    with pytest.raises(InvalidWeightError, match="not positive definite after dampening"):
        ldlq.block_ldl(ldlq.damp_hessian(h, 0.01))
    with pytest.raises(InvalidWeightError, match="no calibration signal"):
        ldlq.damp_hessian(torch.zeros(16, 16), 0.01)


def test_pick_scale_matches_separate_runs():
    torch.manual_seed(1)
    n = 32
    h = synthetic_hessian(n, 3).double()
    u = ldlq.block_ldl(ldlq.damp_hessian(h, 0.01))
    w = torch.randn(24, n, dtype=torch.float64) ** 3  # heavy tails: the scales really differ
    scales = [w.square().mean().sqrt().item() / o for o in (1.03, 0.8, 0.6)]

    def round_block(b):
        return rvq.quantize(b, 2)[1]

    losses = []
    for s in scales:  # one pass per candidate, all rows
        e = ldlq.block_ldlq((w / s).float(), u, round_block).double() * s - w
        losses.append(float(torch.trace(e @ h @ e.T)))
    assert ldlq.pick_scale(w, h, u, scales, round_block, rows=24) == min(range(3), key=losses.__getitem__)
