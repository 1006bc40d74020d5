"""The QuIP# plugin as a quantizer: conformance (beyond the presets test_conformance.py already runs), the
layer's fast path against materialize, storage, bad input, and a real model through modulora.load."""

from __future__ import annotations

import json

import pytest
import torch

import modulora
from modulora_core import CheckpointError, InvalidWeightError, QuantizerConfigError
from modulora_core.testing import QuantizerConformance, gaussian_weight, relative_error, synthetic_hessian
from modulora_plugin_quipsharp import PRESETS, QuipSharpConfig, QuipSharpQuantizer
from modulora_plugin_quipsharp.quantizer import bits_per_weight

Q = QuipSharpQuantizer()


class TestPlainRounding(QuantizerConformance):
    """Incoherence + E8P without BlockLDLQ: the calibration-free branch of the kit."""

    preset = QuipSharpConfig(bits=2, ldlq=False)


class TestPaleyAndRandomSizes(QuantizerConformance):
    """Sizes with Paley factors (24 = 2 x 12, 40 = 2 x 20, 72 = 2 x 36) and a random orthogonal one (344)."""

    preset = "quip#-3bit"
    shapes = ((40, 72), (24, 344))
    gradcheck_shape = (24, 40)

    def test_bits_per_weight_within_budget(self, bound_preset, capabilities, weight_cases) -> None:
        # small weights pay more for their sign vectors (and the 344 one for its 172 x 172 factor) than
        # the declared budget allows; check the storage against the formula instead
        for case in weight_cases:
            assert case.packed.bits_per_weight() == bits_per_weight(bound_preset.config, case.shape)


def quantized(shape, bits=2, seed=0, ldlq=True):
    w = gaussian_weight(shape, seed)
    h = synthetic_hessian(shape[1], seed) if ldlq else None
    return w, Q.quantize_weight(w, QuipSharpConfig(bits=bits, ldlq=ldlq), h)


def test_presets():
    names = set(modulora.available_presets())
    for bits in (2, 3, 4):
        for name in (f"quip#-{bits}bit", f"quipsharp-{bits}bit"):
            assert name in names and PRESETS[name].bits == bits
            assert modulora.get_preset(name).capabilities().needs_calibration
            # the same with QuIP#'s fine-tuning stage
            ft = PRESETS[name + "-ft"]
            assert name + "-ft" in names and ft.ft_steps > 0 and ft.ft_e2e_steps > 0
            assert ft.model_copy(update={"ft_steps": 0, "ft_e2e_steps": 0}) == PRESETS[name]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_materialize_is_the_layer_applied_to_the_identity(bits):
    _, p = quantized((48, 72), bits)
    w = Q.materialize(p, dtype=torch.float64)
    assert torch.allclose(Q.matmul(torch.eye(72, dtype=torch.float64), p), w.T, atol=1e-12)
    assert torch.allclose(Q.matmul_T(torch.eye(48, dtype=torch.float64), p), w, atol=1e-12)


def test_fast_path_runs_in_low_precision_too():
    _, p = quantized((64, 96))
    w = Q.materialize(p, dtype=torch.float32)
    x = torch.randn(5, 96).to(torch.bfloat16)
    y = Q.matmul(x, p)
    assert y.dtype == torch.bfloat16
    assert relative_error(x.float() @ w.T, y.float()) < 1e-2


def test_rows_are_exact_slices_through_both_strategies():
    _, p = quantized((192, 64))  # 192 = 16 x 12: a few rows take the dense-row branch, many the whole
    w = Q.materialize(p, dtype=torch.float32)
    for a, b in ((0, 3), (100, 127), (0, 192), (17, 190)):
        assert torch.equal(Q.materialize(p, dtype=torch.float32, rows=slice(a, b)), w[a:b])
        assert torch.equal(Q.materialize_T(p, dtype=torch.float32, cols=slice(a, b)), w[a:b].T)


def test_storage_layout_and_bits_per_weight():
    _, p = quantized((64, 128), bits=3)
    t = p.tensors
    assert t["codes"].dtype == torch.int16 and t["codes"].shape == (64, 16)
    assert t["codes_residual"].dtype == torch.uint8 and t["codes_residual"].shape == (64, 16)
    assert t["su"].shape == (16,) and t["sv"].shape == (8,) and t["scale"].shape == (1,)
    cfg = QuipSharpConfig(bits=2)
    assert abs(bits_per_weight(cfg, (576, 576)) - 2.0036) < 1e-4  # signs + scale: 0.004 bits on top
    assert bits_per_weight(QuipSharpConfig(bits=4), (1536, 576)) < 4.003
    # Llama's down_proj: the float32 172 x 172 random factor costs 0.021 bits/weight
    assert 2.02 < bits_per_weight(cfg, (4096, 11008)) < 2.025


def test_ldlq_beats_plain_rounding_on_the_hessian_weighted_error():
    w = gaussian_weight((64, 128), 5)
    h = synthetic_hessian(128, 5).double()
    errs = {}
    for ldlq in (True, False):
        p = Q.quantize_weight(w, QuipSharpConfig(ldlq=ldlq), h.float() if ldlq else None)
        e = (Q.materialize(p, dtype=torch.float64) - w.double())
        errs[ldlq] = float(torch.trace(e @ h @ e.T))
    assert errs[True] < 0.85 * errs[False]


def test_seed_changes_only_the_signs_stored():
    w = gaussian_weight((32, 64), 0)
    a = Q.quantize_weight(w, QuipSharpConfig(ldlq=False, seed=1))
    b = Q.quantize_weight(w, QuipSharpConfig(ldlq=False, seed=2))
    assert not torch.equal(a.tensors["su"], b.tensors["su"])
    assert relative_error(Q.materialize(a, dtype=torch.float32), Q.materialize(b, dtype=torch.float32)) < 0.5


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_input_gets_clear_errors():
    bq = modulora.get_preset("quip#-2bit")
    with pytest.raises(InvalidWeightError, match="multiple of 8"):
        bq.quantize(torch.randn(16, 20), torch.eye(20))
    with pytest.raises(InvalidWeightError, match="multiple of 8"):
        bq.quantize(torch.randn(12, 16), torch.eye(16))
    with pytest.raises(InvalidWeightError, match="NaN"):
        bq.quantize(torch.full((16, 16), float("nan")), torch.eye(16))
    with pytest.raises(InvalidWeightError, match="needs calibration"):
        bq.quantize(torch.randn(16, 16))
    indefinite = -torch.eye(16)
    indefinite[0, 0] = 40
    with pytest.raises(InvalidWeightError, match="not positive definite after dampening"):
        bq.quantize(torch.randn(16, 16), indefinite)
    with pytest.raises(QuantizerConfigError, match="bits"):
        QuipSharpConfig.from_json({"bits": 5})
    with pytest.raises(QuantizerConfigError, match="damp"):
        QuipSharpConfig.from_json({"damp": -1})


def test_unpack_rejects_foreign_tensors():
    _, p = quantized((16, 32), bits=4)
    meta = json.loads(json.dumps(p.metadata()))
    bad = dict(p.tensors)
    bad["codes_residual"] = bad["codes_residual"].to(torch.uint8)
    with pytest.raises(CheckpointError, match="codes_residual"):
        Q.unpack(bad, meta)
    with pytest.raises(CheckpointError, match="expected"):
        Q.unpack({k: v for k, v in p.tensors.items() if k != "su"}, meta)


# -- a real model -------------------------------------------------------------------------------------------
def test_tiny_llama_through_modulora_load_and_save(tmp_path):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dense = LlamaForCausalLM(cfg).eval()
    tokens = torch.randint(0, 64, (8, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = dense(input_ids=tokens).logits
    from modulora_core.calibration_data import Calibration

    model = modulora.load(dense, "quipsharp-4bit", calibration=Calibration(tokens, progress=False))
    layers = dict(modulora.iter_quantized_layers(model))  # under PEFT's LoRA layers (r=8 on all 14)
    assert len(layers) == 14 and all(m.use_fast_path for m in layers.values())
    with torch.no_grad():
        out = model(input_ids=tokens).logits
    assert relative_error(ref, out) < 0.2
    loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()
    assert all(p.grad is not None for p in modulora.lora_parameters(model))
    modulora.save_quantized(model, tmp_path / "q")  # the base: the adapters are left out
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert len(list(modulora.iter_quantized_layers(again))) == 14
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens).logits, model(input_ids=tokens).logits)


def test_packed_nbytes_is_exact():
    for shape, bits in (((64, 128), 2), ((40, 72), 3), ((24, 344), 4)):
        _, p = quantized(shape, bits)
        assert Q.packed_nbytes(shape, p.config) == p.nbytes()
    with pytest.raises(InvalidWeightError, match="multiple"):
        Q.packed_nbytes((12, 16), QuipSharpConfig())
