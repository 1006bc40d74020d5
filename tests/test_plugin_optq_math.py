"""modulora_plugin_optq's math on its own: GPTQ v1 packing, the GPTQ solver and its options (act-order,
group-aware order, clipping search, dampening), and clear errors for bad input."""

from __future__ import annotations

import pytest
import torch

from modulora_core import InvalidWeightError, QuantizerConfigError
from modulora_core.testing.weights import gaussian_weight, synthetic_hessian
from modulora_plugin_optq import OPTQConfig, OPTQQuantizer
from modulora_plugin_optq.gptq import group_aware_order, group_params
from modulora_plugin_optq.packing import pack_rows, unpack_rows, zeros_v1_to_v2, zeros_v2_to_v1

Q = OPTQQuantizer()

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


# -- packing -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("n", [1, 31, 32, 100, 576])
def test_pack_round_trip(bits, n):
    v = torch.randint(0, 1 << bits, (n, 3), generator=torch.Generator().manual_seed(n))
    words = pack_rows(v, bits)
    assert words.dtype == torch.int32 and words.shape == (-(-n * bits // 32), 3)
    assert torch.equal(unpack_rows(words, bits, n).long(), v)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_values_sit_in_a_little_endian_bit_stream(bits):
    # value k occupies bits [bits*k, bits*k + bits) of the words, read least significant bit first
    v = torch.randint(0, 1 << bits, (64, 1), generator=torch.Generator().manual_seed(bits))
    words = pack_rows(v, bits)[:, 0].tolist()
    stream = "".join(format(w & 0xFFFFFFFF, "032b")[::-1] for w in words)
    assert [int(stream[bits * k: bits * k + bits][::-1], 2) for k in range(64)] == v[:, 0].tolist()


def test_v1_zeros_store_zero_minus_one():
    z = torch.full((2, 8), 8)  # symmetric 4-bit: zero 8 is stored as 7 in every nibble
    assert zeros_v2_to_v1(z, 4).tolist() == [[0x77777777]] * 2
    for bits in (2, 3, 4, 8):  # a zero of 0 borrows from its neighbour in v1 and carries back exactly
        z = torch.randint(0, 1 << bits, (3, 70), generator=torch.Generator().manual_seed(bits))
        z[:, ::5] = 0
        assert torch.equal(zeros_v1_to_v2(zeros_v2_to_v1(z, bits), bits, 70).long(), z)


# -- the algorithm ---------------------------------------------------------------------------------------------
def rtn(w: torch.Tensor, bits: int, gs: int) -> torch.Tensor:
    out = torch.empty_like(w)
    for a in range(0, w.shape[1], gs):
        s, z = group_params(w[:, a:a + gs], bits, True)
        q = torch.clamp(torch.round(w[:, a:a + gs] / s[:, None]) + z[:, None], 0, (1 << bits) - 1)
        out[:, a:a + gs] = s[:, None] * (q - z[:, None])
    return out


def dense(cfg: OPTQConfig, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return Q.materialize(Q.quantize_weight(w, cfg, h), dtype=torch.float32)


def test_identity_hessian_is_round_to_nearest():
    # no correlation between inputs: no error is fed forward, so GPTQ rounds each weight to nearest (on min-max
    # ranges: the clipping search off)
    w = gaussian_weight((48, 256), 0)
    torch.testing.assert_close(dense(OPTQConfig(bits=3, group_size=64, mse=0), w, torch.eye(256)), rtn(w, 3, 64),
                               rtol=0, atol=0)


@pytest.mark.parametrize("sym", [True, False])
def test_clipping_search_never_rounds_worse_than_min_max(sym):
    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 128))  # heavy tails: outliers worth clipping
    err = {}
    for mse in (0.0, 2.4):
        s, z = group_params(w, 3, sym, mse)
        q = torch.clamp(torch.round(w / s[:, None]) + z[:, None], 0, 7)
        err[mse] = ((s[:, None] * (q - z[:, None]) - w).abs() ** 2.4).sum(1)  # per row, the searched norm
    assert bool((err[2.4] <= err[0.0] * (1 + 1e-6)).all())  # the search includes the full range
    assert float(err[2.4].sum()) < 0.9 * float(err[0.0].sum())  # measured 0.80 (asymmetric), 0.71 (symmetric)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("desc_act", [False, True])
def test_gptq_beats_round_to_nearest_on_the_output_error(bits, desc_act):
    w, h = gaussian_weight((96, 256), 1), synthetic_hessian(256, 1)

    def out_err(a: torch.Tensor) -> float:
        return float(torch.trace((w - a) @ h @ (w - a).T))

    g = out_err(dense(OPTQConfig(bits=bits, desc_act=desc_act), w, h))
    assert g < 0.85 * out_err(rtn(w, bits, 128))


def test_act_order_g_idx():
    w, h = gaussian_weight((32, 256), 2), synthetic_hessian(256, 2)
    dyn = Q.quantize_weight(w, OPTQConfig(bits=4, group_size=64, desc_act=True), h).tensors["g_idx"]
    perm = torch.argsort(h.diagonal(), descending=True, stable=True)
    assert torch.equal(dyn[perm], (torch.arange(256) // 64).int())  # groups follow the act order
    assert bool((dyn[1:] < dyn[:-1]).any())  # so g_idx is not monotonic
    static = Q.quantize_weight(w, OPTQConfig(bits=4, group_size=64, desc_act=True, static_groups=True), h)
    assert torch.equal(static.tensors["g_idx"], (torch.arange(256) // 64).int())


def test_group_aware_order_keeps_groups_whole_and_g_idx_plain():
    diag = torch.tensor([1.0, 5.0, 2.0, 0.5, 9.0, 3.0, 7.0])  # groups of 2: (1, 5), (2, .5), (9, 3), tail (7)
    assert group_aware_order(diag, 2).tolist() == [4, 5, 1, 0, 2, 3, 6]  # by group max, then inside each group
    w, h = gaussian_weight((32, 96), 6), synthetic_hessian(96, 6)  # 96 = 64 + 32: a ragged last group
    p = Q.quantize_weight(w, OPTQConfig(bits=3, group_size=64, act_group_aware=True), h)
    assert torch.equal(p.tensors["g_idx"], (torch.arange(96) // 64).int())  # an ordinary act-order-off layout
    assert float((Q.materialize(p, dtype=torch.float32) - w).norm() / w.norm()) < 0.35


def test_dead_inputs_become_zero_columns():
    w, h = gaussian_weight((32, 128), 3), synthetic_hessian(128, 3)
    dead = torch.tensor([0, 5, 77])
    h[dead, :] = 0
    h[:, dead] = 0
    q = dense(OPTQConfig(bits=4, group_size=32, desc_act=True), w, h)
    assert bool(torch.isfinite(q).all()) and bool((q[:, dead] == 0).all())


def test_group_size_not_dividing_in_features_gives_a_smaller_last_group():
    w, h = gaussian_weight((40, 96), 4), synthetic_hessian(96, 4)  # 96 = 64 + 32
    p = Q.quantize_weight(w, OPTQConfig(bits=4, group_size=64), h)
    assert p.tensors["scales"].shape == (2, 40) and p.tensors["qweight"].shape == (12, 40)
    assert Q.packed_nbytes((40, 96), p.config) == p.nbytes()
    assert float((dense(OPTQConfig(bits=4, group_size=64), w, h) - w).norm() / w.norm()) < 0.2


def test_bad_input_is_a_clear_error():
    w, h = gaussian_weight((16, 64), 5), synthetic_hessian(64, 5)
    with pytest.raises(QuantizerConfigError, match="bits"):
        OPTQConfig.from_json({"family": "optq", "bits": 5})
    with pytest.raises(QuantizerConfigError, match="group_size"):
        OPTQConfig.from_json({"family": "optq", "group_size": 48})
    with pytest.raises(QuantizerConfigError, match="damp_percent"):
        OPTQConfig.from_json({"family": "optq", "damp_percent": 0})
    cfg = OPTQConfig()
    with pytest.raises(InvalidWeightError, match="needs calibration"):
        Q.quantize_weight(w, cfg, None)
    with pytest.raises(InvalidWeightError, match="NaN/inf"):
        Q.quantize_weight(w, cfg, torch.full_like(h, float("nan")))
    bad = h.clone()
    bad[3, 3] = -1.0
    with pytest.raises(InvalidWeightError, match="negative diagonal"):
        Q.quantize_weight(w, cfg, bad)
    with pytest.raises(InvalidWeightError, match="not positive definite"):
        Q.quantize_weight(w, cfg, _indefinite(64))


def test_dampening_is_raised_until_the_hessian_factors():
    # one eigenvalue at -8% of the mean diagonal: 5% dampening cannot lift it, 10% does
    n = 64
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64))
    eig = torch.ones(n, dtype=torch.float64)
    eig[0] = -0.08 * n / (n - 1.08)  # mean diagonal = mean eigenvalue = (n - 1 + eig[0]) / n
    h = (basis @ torch.diag(eig) @ basis.T).float()
    with pytest.warns(UserWarning, match="needed dampening 0.1 instead of damp_percent=0.05"):
        p = Q.quantize_weight(gaussian_weight((16, n), 8), OPTQConfig(bits=4, group_size=32), h)
    assert bool(torch.isfinite(Q.materialize(p, dtype=torch.float32)).all())


def _indefinite(n: int) -> torch.Tensor:
    """Diagonal 1, off-diagonal -10: a negative eigenvalue of 11 - 10 n that 1% dampening cannot lift."""
    return 11 * torch.eye(n) - 10 * torch.ones(n, n)
