"""QuIP#'s fine-tuning stage (modulora_plugin_quipsharp.finetune) on a real tiny Llama: it lowers the block
output error against the unquantized block, the tuned sign vectors are stored and reload exactly, the layer's
fast path and materialize agree on them, old (format 1) checkpoints still load, and the residual LoRA init is
refit against the tuned weights."""

from __future__ import annotations

import copy

import pytest
import torch

import modulora
from modulora_core import CheckpointError, QuantizerConfigError, get_preset
from modulora_core.calibrate import decoder_blocks
from modulora_core.calibration_data import Calibration
from modulora_core.lora_init import LoraInit
from modulora_core.surgery import QuantizeOptions, quantize_model
from modulora_core.testing import QuantizerConformance, gaussian_weight, relative_error, synthetic_hessian
from modulora_plugin_quipsharp import QuipSharpConfig, QuipSharpQuantizer, finetune
from modulora_plugin_quipsharp.quantizer import bits_per_weight

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread

Q = QuipSharpQuantizer()
FT = QuipSharpConfig(bits=2, ft_steps=40, ft_lr=1e-2)


class TestRealSignStorage(QuantizerConformance):
    """The conformance kit over the float16 sign storage that ``ft_steps`` > 0 selects (per weight, with no
    decoder block around it, the stage does not run: the signs are still +-1)."""

    preset = QuipSharpConfig(bits=2, ft_steps=4)


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tokens(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, 32), generator=torch.Generator().manual_seed(seed))


def quantized(config: QuipSharpConfig):
    return modulora.load(tiny_llama(), config, lora=None, calibration=Calibration(tokens(), progress=False))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tuning_lowers_each_blocks_error_and_the_models():
    stats = []
    tune = finetune.tune_block

    def spy(*args, **kwargs):
        stats.append(tune(*args, **kwargs))
        return stats[-1]

    finetune.tune_block = spy
    try:
        tuned = quantized(FT)
    finally:
        finetune.tune_block = tune
    assert len(stats) == 2 and all(s["kept"] and s["after"] < 0.9 * s["before"] for s in stats)
    plain = quantized(FT.model_copy(update={"ft_steps": 0}))
    held_out, ref = tokens(8, seed=1), logits(tiny_llama(), tokens(8, seed=1))
    assert relative_error(ref, logits(tuned, held_out)) < 0.95 * relative_error(ref, logits(plain, held_out))
    # the signs moved off +-1; the codes did not
    a, b = (dict(modulora.iter_quantized_layers(m))["model.layers.0.mlp.down_proj"].packed for m in (tuned, plain))
    assert a.tensors["su"].dtype == torch.float16 and not torch.equal(a.tensors["su"].abs(), torch.ones(128).half())
    assert torch.equal(a.tensors["codes"], b.tensors["codes"])


def test_tune_block_leaves_a_block_it_cannot_improve_untouched():
    model = quantized(FT.model_copy(update={"ft_steps": 0}))
    block = model.get_submodule(decoder_blocks(model))[0]
    x = torch.randn(2, 32, 64)
    pos = torch.arange(32)[None]
    emb = model.model.rotary_emb(x, pos)

    def run(j: int) -> torch.Tensor:
        out = block(x, position_embeddings=emb)
        return out[0] if isinstance(out, tuple) else out

    before = {k: v.clone() for k, v in block.state_dict().items()}
    with torch.no_grad():
        targets = [run(0)]  # the quantized block's own output: its error is 0 already, tuning can only lose
    stats = finetune.tune_block(block, ["mlp.down_proj", "self_attn.q_proj"], run, targets, FT, Q)
    assert not stats["kept"]
    after = block.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fast_path_and_materialize_agree_on_tuned_signs():
    layer = dict(modulora.iter_quantized_layers(quantized(FT)))["model.layers.1.self_attn.o_proj"]
    x = torch.randn(5, 64, dtype=torch.float64)
    w = layer.dequantize(torch.float64)
    assert torch.allclose(Q.matmul(x, layer.packed), x @ w.T, rtol=1e-10, atol=1e-12)
    assert torch.equal(Q.materialize(layer.packed, dtype=torch.float64, rows=slice(8, 24)), w[8:24])


def test_save_and_reload_give_identical_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantized(FT)
    modulora.save_quantized(model, tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = tokens(4, seed=2)
    assert torch.equal(logits(again, ids), logits(model, ids))
    su = dict(modulora.iter_quantized_layers(again))["model.layers.0.self_attn.k_proj"].packed.tensors["su"]
    assert su.dtype == torch.float16 and su.shape == (64,)


def test_format_1_packed_weights_still_load():
    """A version-1 weight (signs as bits, a config without the ft fields) reads as ft_steps = 0 (whatever
    the default: unpack forces it) and gives the same dense weight."""
    w, h = gaussian_weight((32, 64), 0), synthetic_hessian(64, 0)
    p = Q.quantize_weight(w, QuipSharpConfig(bits=3), h)
    meta = p.metadata()
    meta["format_version"] = 1
    meta["config"] = {k: v for k, v in meta["config"].items() if not k.startswith("ft_")}
    again = Q.unpack(p.tensors, meta)
    assert again.config.ft_steps == 0 and again.format_version == Q.format_version
    assert torch.equal(Q.materialize(again, dtype=torch.float64), Q.materialize(p, dtype=torch.float64))
    meta["format_version"] = 3
    with pytest.raises(CheckpointError, match="format_version 3"):
        Q.unpack(p.tensors, meta)


def test_storage_and_bits_per_weight():
    cfg = QuipSharpConfig(bits=4, ft_steps=8)
    p = Q.quantize_weight(gaussian_weight((32, 64), 0), cfg, synthetic_hessian(64, 0))
    assert {k: (t.dtype, tuple(t.shape)) for k, t in p.tensors.items() if k in ("su", "sv")} == {
        "su": (torch.float16, (64,)), "sv": (torch.float16, (32,))}
    assert p.nbytes() == Q.packed_nbytes((32, 64), cfg)
    assert bits_per_weight(cfg, (576, 576)) == pytest.approx(4 + (16 * 1152 + 32) / 576**2)


@pytest.mark.parametrize("bad", [{"ft_steps": -1}, {"ft_lr": 0.0}, {"ft_lr": 2.0}, {"ft_steps": 1.5}])
def test_bad_fine_tuning_settings_are_clear_errors(bad):
    with pytest.raises(QuantizerConfigError, match="ft_"):
        get_preset("quip#").config.from_json({"family": "quip#", **bad})


def test_residual_lora_init_is_refit_against_the_tuned_weights():
    dense = tiny_llama()
    init = LoraInit(rank=64, activation_aware=False)  # full rank: B0 A0 is the whole residual
    model = copy.deepcopy(dense)
    quantize_model(model, FT, QuantizeOptions(calibration=Calibration(tokens(), progress=False), lora_init=init))
    name = "model.layers.1.mlp.gate_proj"
    B0, A0 = init.factors[name]
    w = dense.get_submodule(name).weight.detach()
    w_q = model.get_submodule(name).dequantize(torch.float32)
    assert torch.allclose(w_q + B0 @ A0, w, atol=1e-5)
