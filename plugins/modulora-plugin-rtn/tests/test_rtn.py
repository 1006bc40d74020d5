"""RTN: the conformance kit (the three lines every plugin needs) plus RTN's own bit packing and scaling."""

from __future__ import annotations

import pytest
import torch
from modulora_plugin_rtn import RTNConfig
from modulora_plugin_rtn.bitpack import pack_codes, packed_cols, unpack_codes

from modulora_core import QuantizerConfigError, get_preset
from modulora_core.testing import QuantizerConformance, gaussian_weight, relative_error


class TestRTN4bit(QuantizerConformance):
    preset = "rtn-4bit"


class TestRTNSymmetric3bitGroup32(QuantizerConformance):
    preset = RTNConfig(bits=3, group_size=32, symmetric=True)  # a config object, not a preset name


class TestRTNWholeRowGroups(QuantizerConformance):
    preset = RTNConfig(bits=4, group_size=-1)
    shapes = ((64, 128), (256, 64))


# -- bit packing --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 67])  # rows of 1..67 codes: most end in a partial byte group
def test_bitpack_round_trip(bits: int, n: int) -> None:
    g = torch.Generator().manual_seed(bits * 100 + n)
    codes = torch.randint(0, 1 << bits, (11, n), generator=g, dtype=torch.uint8)  # (rows, n)
    codes[0] = (1 << bits) - 1  # all bits set: catches sign extension in the word assembly
    codes[1] = 0
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (11, packed_cols(n, bits))
    assert packed.shape[1] * 8 == -(-n // 8) * 8 * bits  # bits per code, rows padded to 8 codes
    assert torch.equal(unpack_codes(packed, bits, n), codes)
    for a, b in ((0, 5), (5, 11), (3, 4), (10, 11)):  # row blocks unpack on their own, ragged ones too
        assert torch.equal(unpack_codes(packed[a:b], bits, n), codes[a:b])


def test_bitpack_layout_is_little_endian_within_a_group() -> None:
    codes = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x03, 0x00, 0x00]]
    assert pack_codes(codes, 2).tolist() == [[0b00111001, 0x00]]


# -- scaling --------------------------------------------------------------------------------------------------
def quantize(cfg: RTNConfig, w: torch.Tensor):
    bq = get_preset(cfg)
    packed = bq.quantize(w)
    return packed, bq.quantizer.materialize(packed, dtype=torch.float32)


def test_symmetric_stores_no_zero_points_and_fewer_bits() -> None:
    w = gaussian_weight((32, 128), seed=1)
    asym, _ = quantize(RTNConfig(bits=4), w)
    sym, _ = quantize(RTNConfig(bits=4, symmetric=True), w)
    assert set(asym.tensors) == {"codes", "scales", "zeros"} and set(sym.tensors) == {"codes", "scales"}
    assert sym.bits_per_weight() == pytest.approx(asym.bits_per_weight() - 8 / 64)


def test_asymmetric_uses_the_range_of_a_one_sided_weight() -> None:
    w = gaussian_weight((32, 128), seed=2).abs()  # all >= 0: symmetric wastes half its levels
    _, q_asym = quantize(RTNConfig(bits=3), w)
    _, q_sym = quantize(RTNConfig(bits=3, symmetric=True), w)
    assert relative_error(w, q_asym) < 0.6 * relative_error(w, q_sym)


@pytest.mark.parametrize("symmetric", [False, True])
def test_exact_zeros_stay_zero(symmetric: bool) -> None:
    w = gaussian_weight((16, 64), seed=3)
    w[:, ::5] = 0.0
    _, q = quantize(RTNConfig(bits=2, symmetric=symmetric), w)
    assert torch.all(q[:, ::5] == 0)


def test_groups_are_independent() -> None:
    w = gaussian_weight((8, 128), seed=4)
    spiked = w.clone()
    spiked[:, 64:] *= 1000  # the second group's scale must not leak into the first
    _, q1 = quantize(RTNConfig(bits=4), w)
    _, q2 = quantize(RTNConfig(bits=4), spiked)
    assert torch.equal(q1[:, :64], q2[:, :64])


def test_ragged_last_group() -> None:
    w = gaussian_weight((8, 100), seed=5)  # 100 = 64 + 36: the last group is short
    packed, q = quantize(RTNConfig(bits=4), w)
    assert q.shape == (8, 100) and packed.tensors["scales"].shape == (8, 2)
    assert relative_error(w, q) < get_preset("rtn-4bit").capabilities().max_relative_error


@pytest.mark.parametrize(("data", "field"), [({"bits": 5}, "bits"), ({"group_size": 4}, "group_size")])
def test_unsupported_config_is_refused(data: dict, field: str) -> None:
    with pytest.raises(QuantizerConfigError, match=field):
        RTNConfig.from_json({"family": "rtn", **data})
