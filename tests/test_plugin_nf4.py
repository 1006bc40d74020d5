"""The NF4 plugin: the format itself, parity with bitsandbytes, and taking over a bitsandbytes 4-bit model.

The parity and interop tests skip, with the reason, when bitsandbytes (the ``bnb`` extra) is absent.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM

import modulora
from modulora_core import CheckpointError, InvalidWeightError, QuantizerConfigError
from modulora_core.testing import QuantizerConformance, gaussian_weight, student_t_weight
from modulora_plugin_nf4 import PRESETS, NF4Config, NF4Quantizer
from modulora_plugin_nf4.blockwise import pack_nibbles, quantize_4bit, unpack_nibbles
from modulora_plugin_nf4.levels import dynamic_map, encoder, levels

Q = NF4Quantizer()
try:
    HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
except (ImportError, ValueError):  # a broken or blocked installation counts as absent
    HAS_BNB = False
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="bitsandbytes is not installed (pip install 'modulora[bnb]')")


class TestNF4(QuantizerConformance):
    preset = "nf4"


class TestNF4NoDQ(QuantizerConformance):
    preset = "nf4-nodq"


class TestFP4(QuantizerConformance):
    preset = "fp4"


class TestFP4NoDQ(QuantizerConformance):
    preset = "fp4-nodq"


def flat_reference(packed: modulora.PackedWeight) -> torch.Tensor:
    """The definition, decoded the slow way: level of each code times the absmax of its flat block."""
    cfg, (out_f, in_f) = packed.config, packed.shape
    n, t = out_f * in_f, packed.tensors
    codes = unpack_nibbles(t["codes"])[:n].long()
    absmax = t["absmax"]
    if cfg.double_quant:
        book = t.get("absmax_code", dynamic_map())
        absmax = book[absmax.long()] * t["absmax_scale"].repeat_interleave(256)[: absmax.numel()] + t["absmax_offset"]
    scale = absmax.repeat_interleave(cfg.blocksize)[:n]
    return (levels(cfg.quant_type)[codes] * scale).view(out_f, in_f)


# -- the format, pure torch --------------------------------------------------------------------------------
def test_levels_are_the_published_ones():
    facts = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0, 0.0795803,
             0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    assert torch.allclose(levels("nf4"), torch.tensor(facts), atol=6e-8, rtol=0)
    assert levels("nf4")[7] == 0 and levels("fp4").abs().max() == 1
    book = dynamic_map()
    assert book.shape == (256,) and bool((book.diff() > 0).all()) and book[-1] == 1 and 0 in book


def test_nibbles_first_code_high():
    codes = torch.tensor([1, 2, 15, 0], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [0x12, 0xF0]
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_value_on_a_threshold_takes_the_lower_level(quant_type):
    mids, order = encoder(quant_type)
    book = levels(quant_type)
    x = torch.cat([torch.ones(1), mids])  # absmax 1: the scaled values are the thresholds themselves
    codes, _ = quantize_4bit(x, quant_type, 64)
    got = book[codes[1: len(mids) + 1].long()]
    assert torch.equal(got, book[order[:-1]]), "a value exactly between two levels must encode as the lower"


@pytest.mark.parametrize("shape", [(7, 9), (33, 70), (5, 100), (3, 64), (1, 1)])
@pytest.mark.parametrize("preset", ["nf4", "fp4-nodq"])
def test_row_blocks_where_blocks_span_rows(shape, preset):
    packed = modulora.get_preset(preset).quantize(gaussian_weight(shape, seed=sum(shape)))
    whole = Q.materialize(packed, dtype=torch.float32)
    assert torch.equal(whole, flat_reference(packed))
    for a in range(shape[0]):
        for b in range(a, shape[0] + 1):
            assert torch.equal(Q.materialize(packed, dtype=torch.float32, rows=slice(a, b)), whole[a:b])


def test_bits_per_weight():
    w = gaussian_weight((1024, 1024), seed=0)
    dq, nodq = (modulora.get_preset(p).quantize(w) for p in ("nf4", "nf4-nodq"))
    # 4 + 8/64 (absmax codes) + 32/(64*256) (their scales) + 32/n (the offset)
    assert dq.bits_per_weight() == pytest.approx(4 + 8 / 64 + 32 / 64 / 256 + 32 / 2**20)
    assert round(dq.bits_per_weight(), 3) == 4.127
    assert nodq.bits_per_weight() == 4.5


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_error_within_declared_bounds_on_a_large_weight(preset):
    bq = modulora.get_preset(preset)
    caps = bq.capabilities()
    for make, bound in ((gaussian_weight, caps.max_relative_error),
                        (student_t_weight, caps.max_relative_error_heavy_tailed)):
        w = make((512, 1024), 3, 0.02)
        err = float((Q.materialize(bq.quantize(w), dtype=torch.float32) - w).norm() / w.norm())
        assert err < bound / 1.2, f"{preset} {make.__name__}: {err:.4f} is too close to the bound {bound:.4f}"


def test_degenerate_weights():
    for w in (torch.zeros(4, 64), torch.ones(4, 64), torch.full((2, 130), -0.5)):
        for cfg in (NF4Config(), NF4Config(double_quant=False)):
            # a constant absmax leaves double quantization a block of zeros with scale 0: still exact
            assert torch.equal(Q.materialize(Q.quantize_weight(w, cfg), dtype=torch.float32), w)


def test_low_precision_input_and_output():
    w = gaussian_weight((16, 64), seed=1).to(torch.bfloat16)
    p = Q.quantize_weight(w, NF4Config())
    assert p.dtype == torch.bfloat16
    ref = Q.materialize(p, dtype=torch.float32)
    assert torch.equal(Q.materialize(p, dtype=torch.float64), ref.double())
    assert torch.equal(Q.materialize(p, dtype=torch.bfloat16), ref.bfloat16())


def test_bad_input_errors():
    with pytest.raises(QuantizerConfigError, match="blocksize must be one of"):
        NF4Config.from_json({"blocksize": 48})
    with pytest.raises(QuantizerConfigError, match="quant_type"):
        NF4Config.from_json({"quant_type": "int4"})
    w = gaussian_weight((8, 64), seed=0)
    w[3, 5] = float("nan")
    with pytest.raises(InvalidWeightError, match="NaN"):
        Q.quantize_weight(w, NF4Config())
    with pytest.raises(InvalidWeightError, match="2-D"):
        Q.quantize_weight(torch.randn(64), NF4Config())
    p = Q.quantize_weight(gaussian_weight((8, 64), seed=0), NF4Config())
    with pytest.raises(InvalidWeightError, match="step 1"):
        Q.materialize(p, dtype=torch.float32, rows=slice(0, 8, 2))
    meta = json.loads(json.dumps(p.metadata()))
    with pytest.raises(CheckpointError, match="expected torch.uint8"):
        Q.unpack({**p.tensors, "codes": p.tensors["codes"][:-1]}, meta)
    with pytest.raises(CheckpointError, match="expected"):
        Q.unpack({"codes": p.tensors["codes"]}, meta)
    with pytest.raises(CheckpointError, match=r"\(256,\); expected torch.uint8 \(512,\)"):
        Q.unpack(p.tensors, {**meta, "shape": [16, 64]})


def test_detect_ignores_what_is_not_bitsandbytes(tmp_path):
    from modulora_plugin_nf4 import modulora_detect_format

    assert modulora_detect_format(model_or_path=nn.Sequential(nn.Linear(4, 4))) is None
    assert modulora_detect_format(model_or_path=str(tmp_path)) is None
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "gptq"}}))
    assert modulora_detect_format(model_or_path=tmp_path) is None


# -- parity with bitsandbytes ------------------------------------------------------------------------------
PARITY_SHAPES = [(64, 128), (96, 256), (256, 64), (33, 70), (64, 96)]


@needs_bnb
def test_bnb_tables_match():
    import bitsandbytes.functional as F

    assert torch.equal(levels("nf4"), F.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(levels("fp4"), F.get_4bit_type("fp4", device="cpu"))
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", PARITY_SHAPES)
@pytest.mark.parametrize("kind", ["gaussian", "student_t"])
def test_bnb_parity(quant_type, shape, kind):
    import bitsandbytes.functional as F

    from modulora_plugin_nf4.bnb_format import packed_from_quant_state

    w = (gaussian_weight if kind == "gaussian" else student_t_weight)(shape, sum(shape))
    aligned = shape[1] % 64 == 0
    for dq in (False, True):
        ours = Q.quantize_weight(w, NF4Config(quant_type=quant_type, double_quant=dq))
        data, state = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=dq)
        assert torch.equal(ours.tensors["codes"], data.view(-1)), "4-bit codes differ from bitsandbytes'"
        bnb_w = F.dequantize_4bit(data, state)
        # bitsandbytes' state converted to ours decodes to its own dequantize_4bit, bit for bit. Where blocks
        # span rows (in % 64 != 0), bitsandbytes 0.50's AVX512 CPU kernel decodes blocks per row for some
        # widths (in = 96 here), against its own flat quantization; we follow the flat definition
        converted = Q.materialize(packed_from_quant_state(data, state), dtype=torch.float32)
        assert torch.equal(converted, bnb_w if aligned else flat_reference(packed_from_quant_state(data, state)))
        ours_w = Q.materialize(ours, dtype=torch.float32)
        if not dq:
            assert torch.equal(ours.tensors["absmax"], state.absmax)
            assert torch.equal(ours_w, converted)
            continue
        assert torch.equal(ours.tensors["absmax_scale"], state.state2.absmax)
        assert torch.equal(ours.tensors["absmax_offset"], state.offset.reshape(1))
        # The 8-bit absmax codes can differ: bitsandbytes' CPU quantizer finds the level through a bucket
        # table over (x + 1) in float32 and picks the farther neighbour in about 0.2% of cases (near
        # ties, and near zero where levels are closer than float32 resolves 1 + x); we always take the
        # nearest level. Everything else, and every weight outside those blocks, is identical.
        same = ours.tensors["absmax"] == state.absmax
        assert same.float().mean() >= 0.97
        book, differ = dynamic_map(), (~same).nonzero().flatten()
        if differ.numel():
            centered = F.quantize_4bit(w, blocksize=64, quant_type=quant_type)[1].absmax - state.offset
            v = centered[differ] / state.state2.absmax[differ // 256]
            ours_d = (book[ours.tensors["absmax"][differ].long()] - v).abs()
            bnb_d = (book[state.absmax[differ].long()] - v).abs()
            assert bool((ours_d <= bnb_d).all()), "where the 8-bit codes differ, ours must be the nearer"
        block_same = same.repeat_interleave(64)[: w.numel()].view(shape)
        assert torch.equal(ours_w[block_same], converted[block_same])


# -- taking over a bitsandbytes 4-bit model ----------------------------------------------------------------
def _bnb_model(path, quant_type="nf4", double_quant=True):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=torch.float32,
                             bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg)
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            # On AVX512-BF16 CPUs bitsandbytes' eval forward repacks the weight and computes in bfloat16;
            # compare against its float32 path instead
            m.support_avx512bf16_for_cpu = False
    return model


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (pip install 'modulora[bnb]')")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@needs_bnb
@pytest.mark.parametrize(("quant_type", "double_quant"), [("nf4", True), ("fp4", False)])
def test_takeover_matches_bnb_logits(tiny_llama, tmp_path, quant_type, double_quant):
    import bitsandbytes as bnb

    model = _bnb_model(tiny_llama, quant_type, double_quant)
    x = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(x).logits
    q_proj = model.model.layers[0].self_attn.q_proj
    data = q_proj.weight.data
    taken = modulora.load(model, lora=None)  # no quantizer name: the plugin's detect hook claims the model
    assert taken is model  # converted in place
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in taken.modules())
    layer = taken.model.layers[0].self_attn.q_proj
    assert isinstance(layer, modulora.QuantizedLinear)
    assert layer.packed_codes.data_ptr() == data.data_ptr(), "converted in place, not re-quantized"
    preset = "nf4" if double_quant else f"{quant_type}-nodq"
    layers = dict(modulora.iter_quantized_layers(taken))
    assert len(layers) == 14 and {m.preset for m in layers.values()} == {preset}
    qc = taken.config.quantization_config  # bitsandbytes' record is gone, ModuLoRA's is there
    assert isinstance(qc, modulora.ModuLoRAConfig) and qc.preset == preset and len(qc.modules) == 14
    assert qc.quantizer_config["quant_type"] == quant_type and qc.quantizer_config["double_quant"] == double_quant
    assert not any(p.requires_grad for p in taken.parameters())
    with torch.no_grad():
        out = taken(x).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)

    modulora.save_quantized(taken, tmp_path / "q")  # our own format from here on
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]["quant_method"] == "modulora"
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert {m.preset for _, m in modulora.iter_quantized_layers(again)} == {preset}
    peft_model = modulora.load(tmp_path / "q")  # PEFT LoRA (r=8, B = 0) on the reloaded base
    assert isinstance(peft_model, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, out, atol=0, rtol=0)
        torch.testing.assert_close(peft_model(x).logits, out, atol=0, rtol=0)


@needs_bnb
def test_takeover_from_a_saved_bnb_directory(tiny_llama, tmp_path):
    model = _bnb_model(tiny_llama)
    x = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(x).logits
    model.save_pretrained(tmp_path / "bnb")
    taken = modulora.load(tmp_path / "bnb")  # loaded by transformers + bitsandbytes, taken over, LoRA on top
    assert isinstance(taken, PeftModel)
    assert len(list(modulora.iter_quantized_layers(taken))) == 14
    with torch.no_grad():
        torch.testing.assert_close(taken(x).logits, ref, atol=1e-5, rtol=0)


@needs_bnb
def test_takeover_of_a_cpu_repacked_weight():
    import bitsandbytes.functional as F

    from modulora_plugin_nf4.bnb_format import packed_from_quant_state

    repack = getattr(F, "_convert_weight_packed_for_cpu", None)
    if repack is None:
        pytest.skip("this bitsandbytes has no AVX512-BF16 CPU layout")
    w = gaussian_weight((64, 128), seed=5)
    data, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    codes = unpack_nibbles(data.view(-1)).long()
    rounded_absmax = (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).bfloat16().float()
    packed = packed_from_quant_state(*repack(data.clone(), state))
    assert not packed.config.double_quant
    assert torch.equal(packed.tensors["absmax"], rounded_absmax)  # what bitsandbytes now computes with
    expected = levels("nf4")[codes] * rounded_absmax.repeat_interleave(64)
    assert torch.equal(Q.materialize(packed, dtype=torch.float32), expected.view(64, 128))


@needs_bnb
def test_takeover_refuses_an_unquantized_linear4bit():
    import bitsandbytes as bnb

    from modulora_plugin_nf4.bnb_format import packed_from_linear4bit

    lin = bnb.nn.Linear4bit(64, 32, compute_dtype=torch.float32)  # not moved to a device: not quantized yet
    with pytest.raises(CheckpointError, match="quant_state"):
        packed_from_linear4bit(lin)


@needs_bnb
def test_load_with_the_matching_quantizer_name_takes_over_and_another_name_is_refused(tiny_llama):
    x = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(2))
    model = _bnb_model(tiny_llama)
    with torch.no_grad():
        ref = model(x).logits
    taken = modulora.load(model, "nf4")  # same format: converted, not re-quantized
    assert {m.preset for _, m in modulora.iter_quantized_layers(taken)} == {"nf4"}
    with torch.no_grad():
        torch.testing.assert_close(taken(x).logits, ref, atol=1e-5, rtol=0)
    with pytest.raises(modulora.ModuLoRAError, match="quantized with 'nf4'.*not the requested 'rtn-4bit'.*dense weights are gone"):
        modulora.load(_bnb_model(tiny_llama), "rtn-4bit")
