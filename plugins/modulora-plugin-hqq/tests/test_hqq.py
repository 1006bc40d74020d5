"""modulora-plugin-hqq: parity with hqq's own HQQLinear, hqq's packed layout, bad input, and the kit."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("hqq.core.quantize", reason="the hqq library is not installed (pip install 'hqq>=0.2')")

from hqq.core.quantize import BaseQuantizeConfig, HQQLinear  # noqa: E402
from hqq.core.quantize import Quantizer as HQQ  # noqa: E402
from modulora_plugin_hqq import HQQConfig, HQQQuantizer  # noqa: E402
from modulora_plugin_hqq.packing import CODES_PER_WORD, PACKING, packed_rows, read_codes  # noqa: E402

from modulora_core import InvalidWeightError, QuantizerConfigError, available_presets  # noqa: E402
from modulora_core.testing import QuantizerConformance, gaussian_weight, relative_error  # noqa: E402

Q = HQQQuantizer()
SHAPE = (96, 256)  # out, in: 4 groups of 64 per row


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # small tensors: on a busy CPU, 2+ OpenMP threads turn milliseconds of HQQ solver steps into seconds
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def hqq_linear(w: torch.Tensor, bits: int, axis: int, compute_dtype: torch.dtype) -> HQQLinear:
    """hqq's reference: HQQLinear with BaseQuantizeConfig defaults (group 64), on CPU."""
    cfg = BaseQuantizeConfig(nbits=bits, group_size=64, axis=axis)
    return HQQLinear.from_weights(w.clone(), None, cfg, compute_dtype=compute_dtype, device="cpu",
                                  del_orig=False)


def test_presets_are_registered() -> None:
    names = available_presets()
    for bits in (1, 2, 3, 4, 8):
        assert f"hqq-{bits}bit" in names


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("meta_dtype", ["float32", "float16"])
def test_matches_hqqlinear_dequantize(bits: int, meta_dtype: str) -> None:
    w = gaussian_weight(SHAPE, seed=bits)
    dt = torch.float32 if meta_dtype == "float32" else torch.float16
    ref = hqq_linear(w, bits, 1, dt)
    packed = Q.quantize_weight(w, HQQConfig(bits=bits, meta_dtype=meta_dtype))
    # the same storage as HQQLinear, tensor for tensor ...
    assert torch.equal(packed.tensors["W_q"], ref.W_q.data)
    assert torch.equal(packed.tensors["scale"], ref.meta["scale"])
    assert torch.equal(packed.tensors["zero"], ref.meta["zero"])
    # ... and the same dense weight, bit for bit, whole and by row blocks, in HQQLinear's compute dtype
    expected = ref.dequantize()
    assert torch.equal(Q.materialize(packed, dtype=dt), expected)
    blocks = [Q.materialize(packed, dtype=dt, rows=slice(a, a + 7)) for a in range(0, SHAPE[0], 7)]
    assert torch.equal(torch.cat(blocks), expected)


@pytest.mark.parametrize("bits", [1, 3])
def test_axis0_matches_hqqlinear_and_slices_rows(bits: int) -> None:
    w = gaussian_weight(SHAPE, seed=10 + bits)
    ref = hqq_linear(w, bits, 0, torch.float32).dequantize()
    cfg = HQQConfig(bits=bits, axis=0, meta_dtype="float32")
    packed = Q.quantize_weight(w, cfg)
    assert torch.equal(Q.materialize(packed, dtype=torch.float32), ref)
    assert torch.equal(Q.materialize(packed, dtype=torch.float32, rows=slice(5, 40)), ref[5:40])
    assert not Q.capabilities(cfg).row_chunking and Q.capabilities(HQQConfig(bits=bits)).row_chunking


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_read_codes_equals_hqq_unpack(bits: int) -> None:
    n_groups, g = 40, 16
    codes = torch.randint(0, 2**bits, (n_groups, g), generator=torch.Generator().manual_seed(bits))
    w_q = HQQ.pack[PACKING[bits]](codes)
    assert w_q.shape[0] == packed_rows(n_groups, bits)
    full = HQQ.unpack[PACKING[bits]](w_q, dtype=torch.float32)[:n_groups]
    assert torch.equal(full, codes.float())
    # ranges inside one slab, across slab boundaries, a single group, empty, and everything
    step = w_q.shape[0]
    for a, b in ((0, 3), (step - 2, step + 3), (1, n_groups - 1), (7, 8), (9, 9), (0, n_groups)):
        assert torch.equal(read_codes(w_q, bits, a, b, torch.float32), full[a:b]), (a, b)
    assert CODES_PER_WORD[bits] * step >= n_groups


def test_solver_settings_reach_hqq_and_are_restored() -> None:
    w = gaussian_weight((64, 128), seed=3)
    solver = HQQ.__dict__["optimize_weights"]
    default = Q.quantize_weight(w, HQQConfig(bits=2))
    one_step = Q.quantize_weight(w, HQQConfig(bits=2, iters=1))
    plain = Q.quantize_weight(w, HQQConfig(bits=2, optimize=False))
    assert HQQ.__dict__["optimize_weights"] is solver  # hqq's class is left as it was
    assert not torch.equal(default.tensors["zero"], one_step.tensors["zero"])
    assert not torch.equal(default.tensors["zero"], plain.tensors["zero"])
    # same settings, spelled out: identical storage
    spelled = Q.quantize_weight(w, HQQConfig(bits=2, lp_norm=0.7, beta=10.0, kappa=1.01, iters=20))
    assert all(torch.equal(default.tensors[k], spelled.tensors[k]) for k in default.tensors)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_error_and_storage_within_declared_bounds(bits: int) -> None:
    cfg = HQQConfig(bits=bits)
    caps = Q.capabilities(cfg)
    w = gaussian_weight((64, 256), seed=20 + bits)
    packed = Q.quantize_weight(w, cfg)
    err = relative_error(w, Q.materialize(packed, dtype=torch.float32))
    assert err <= caps.max_relative_error
    assert packed.bits_per_weight() <= caps.max_bits_per_weight


def test_float16_meta_costs_half_a_bit_at_group_64() -> None:
    w = gaussian_weight((64, 256), seed=1)
    assert Q.quantize_weight(w, HQQConfig(bits=4)).bits_per_weight() == pytest.approx(4.5)
    wide_meta = Q.quantize_weight(w, HQQConfig(bits=4, meta_dtype="float32"))
    assert wide_meta.bits_per_weight() == pytest.approx(5.0)


# -- bad input ----------------------------------------------------------------------------------------------
def test_unsupported_bits_is_a_config_error() -> None:
    with pytest.raises(QuantizerConfigError, match=r"bits=5 is not supported; use one of \(1, 2, 3, 4, 8\)"):
        HQQConfig.from_json({"bits": 5})


def test_group_size_must_be_multiple_of_8() -> None:
    with pytest.raises(QuantizerConfigError, match="group_size=12: hqq needs a multiple of 8"):
        HQQConfig.from_json({"group_size": 12})


def test_group_size_not_dividing_in_features_names_both() -> None:
    with pytest.raises(InvalidWeightError, match="group_size=64 does not divide in_features=96"):
        Q.quantize_weight(gaussian_weight((32, 96), seed=0), HQQConfig(bits=4))


def test_rows_not_packable_names_bits() -> None:
    with pytest.raises(InvalidWeightError, match="out_features=6 must be a multiple of 4 for 2-bit"):
        Q.quantize_weight(gaussian_weight((6, 64), seed=0), HQQConfig(bits=2))


def test_nan_is_rejected() -> None:
    w = gaussian_weight((32, 64), seed=0)
    w[3, 5] = float("nan")
    with pytest.raises(InvalidWeightError, match="NaN"):
        Q.quantize_weight(w, HQQConfig(bits=4))


def test_strided_row_block_is_rejected() -> None:
    packed = Q.quantize_weight(gaussian_weight((32, 64), seed=0), HQQConfig(bits=4))
    with pytest.raises(InvalidWeightError, match="contiguous"):
        Q.materialize(packed, dtype=torch.float32, rows=slice(0, 8, 2))


# -- the conformance kit, on the presets with the most distinct packings -----------------------------------
class TestHQQ2BitConformance(QuantizerConformance):
    preset = "hqq-2bit"


class TestHQQ3BitConformance(QuantizerConformance):
    preset = "hqq-3bit"
