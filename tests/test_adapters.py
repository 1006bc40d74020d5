"""``modulora.save_adapter`` / ``load_adapter``: PEFT's own adapter format (stock PEFT loads it) plus the record
of the base it was trained on, checked before loading; ``modulora.dequantize`` with and without merging."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import peft.peft_model
import pytest
import safetensors
import safetensors.torch
import torch
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modulora
from modulora import QuantizedLinear
from modulora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULORA_CONFIG
from modulora_core.peft_lora import QuantizedLoraLinear

BLOCK_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def lora(r: int = 4, **kw) -> LoraConfig:
    return LoraConfig(**{"r": r, "lora_alpha": 8, "target_modules": BLOCK_LINEARS, "task_type": "CAUSAL_LM", **kw})


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ids) -> tuple[PeftModel, Path]:
    """A ModuLoRA model (rtn-4bit, PEFT LoRA r=4) trained 30 steps on one batch, and its saved adapter."""
    torch.manual_seed(0)
    model = modulora.load(tiny_llama(), "rtn-4bit", lora=lora()).train()
    opt = torch.optim.AdamW(modulora.lora_parameters(model), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.85 * first
    model.eval()
    d = tmp_path_factory.mktemp("adapter")
    assert modulora.save_adapter(model, d) == d
    return model, d


def base(quantizer: str = "rtn-4bit", **kw) -> nn.Module:
    """A fresh quantized base without adapters (same dense weights as the trained one's)."""
    return modulora.load(tiny_llama(**kw), quantizer, lora=None)


def test_adapter_files_are_peft_format(trained):
    _, d = trained
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULORA_CONFIG} <= set(os.listdir(d))
    assert not [n for n in os.listdir(d) if n.startswith(".modulora-tmp")]
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8, "none")
    assert sorted(cfg["target_modules"]) == sorted(BLOCK_LINEARS)
    with safetensors.safe_open(str(d / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
    assert len(keys) == 28 and a.shape == (4, 128)  # no adapter name in the key, as PEFT writes it
    assert not [k for k in keys if "packed_" in k or "base_layer" in k]  # the base is not in it
    ours = json.loads((d / MODULORA_CONFIG).read_text())
    assert (ours["quantizer"], ours["family"], ours["config"]["bits"]) == ("rtn-4bit", "rtn", 4)
    assert ours["base_model"]["hidden_size"] == 64 and ours["base_model"]["num_hidden_layers"] == 2
    assert len(ours["base_model"]["modules"]) == 14
    assert ours["base_model"]["modules"]["model.layers.1.mlp.down_proj"] == [64, 128]


def test_adapter_reloads_onto_a_fresh_base(trained, ids):
    model, d = trained
    want = logits(model, ids)
    fresh = base()
    assert not torch.allclose(logits(fresh, ids), want)
    loaded = modulora.load_adapter(fresh, d)
    assert isinstance(loaded, PeftModel)
    assert sum(isinstance(m, QuantizedLoraLinear) for m in loaded.modules()) == 14
    assert not modulora.lora_parameters(loaded)  # inference unless asked
    torch.testing.assert_close(logits(loaded, ids), want, rtol=0, atol=0)
    trainable = modulora.load_adapter(base(), d, is_trainable=True)
    assert len(modulora.lora_parameters(trainable)) == 28


def test_adapter_added_to_a_peft_model_by_name(trained, ids):
    model, d = trained
    torch.manual_seed(123)
    pm = modulora.load(tiny_llama(), "rtn-4bit", lora=lora(r=8, init_lora_weights=False))
    mine = logits(pm, ids)
    assert modulora.load_adapter(pm, d, adapter_name="trained") is pm
    pm.set_adapter("trained")
    torch.testing.assert_close(logits(pm, ids), logits(model, ids), rtol=0, atol=0)
    pm.set_adapter("default")
    torch.testing.assert_close(logits(pm, ids), mine, rtol=0, atol=0)


def test_stock_peft_loads_the_adapter_on_quantized_and_dequantized_bases(trained, ids, tmp_path):
    model, d = trained
    want = logits(model, ids)
    on_quantized = PeftModel.from_pretrained(base(), d)  # PEFT alone, no ModuLoRA checks
    torch.testing.assert_close(logits(on_quantized, ids), want, rtol=0, atol=0)
    dense = modulora.dequantize(model)
    assert not any(isinstance(m, (QuantizedLinear, QuantizedLoraLinear)) for m in dense.modules())
    on_dense = PeftModel.from_pretrained(dense, d).eval()
    torch.testing.assert_close(logits(on_dense, ids), want, rtol=1e-5, atol=1e-5)


def test_dequantize_with_merge_is_a_plain_dense_model(trained, ids, tmp_path):
    model, _ = trained
    want = logits(model, ids)
    merged = modulora.dequantize(model, merge=True)
    assert type(merged) is LlamaForCausalLM
    assert not any(isinstance(m, (QuantizedLinear, QuantizedLoraLinear)) for m in merged.modules())
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)  # a plain dense checkpoint
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    assert not any(isinstance(m, QuantizedLinear) for m in again.modules())
    torch.testing.assert_close(logits(again, ids), want, rtol=1e-5, atol=1e-5)
    assert isinstance(model.get_base_model().model.layers[0].self_attn.q_proj, QuantizedLoraLinear)  # untouched


def test_dequantize_without_merge_is_the_base(trained, ids):
    model, _ = trained
    dense = modulora.dequantize(model)
    assert dense is not model and type(dense) is LlamaForCausalLM
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in dense.parameters())
    with model.disable_adapter():
        torch.testing.assert_close(logits(dense, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj.get_base_layer()
    assert torch.equal(dense.model.layers[0].self_attn.q_proj.weight, layer.dequantize())
    plain = base()  # a quantized model without adapters, too
    assert torch.equal(modulora.dequantize(plain).model.layers[1].mlp.up_proj.weight,
                       plain.model.layers[1].mlp.up_proj.dequantize())
    assert getattr(modulora.dequantize(plain), "is_quantized", False) is False


def test_partial_regex_targets_round_trip(tmp_path, ids):
    targets = r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.up_proj"
    model = modulora.load(tiny_llama(), "rtn-4bit", lora=LoraConfig(target_modules=targets, init_lora_weights=False))
    assert sum(isinstance(m, QuantizedLoraLinear) for m in model.modules()) == 2
    modulora.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_modules"]
    assert isinstance(written, str)
    assert re.fullmatch(written, "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(written, "model.layers.1.self_attn.q_proj")
    back = modulora.load_adapter(base(), tmp_path)
    torch.testing.assert_close(logits(back, ids), logits(model, ids), rtol=0, atol=0)
    peft_model = PeftModel.from_pretrained(modulora.dequantize(model), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_adapter_made_for_another_base_or_quantizer_is_refused(trained, tmp_path, ids):
    model, d = trained
    with pytest.raises(modulora.AdapterError, match="another base model.*num_hidden_layers"):
        modulora.load_adapter(base(layers=3), d)
    with pytest.raises(modulora.AdapterError, match="another base model.*quantized modules"):
        modulora.load_adapter(modulora.load(tiny_llama(), "rtn-4bit", lora=None,
                                            modules_to_not_convert=["down_proj"]), d)
    other_q = base("rtn-2bit")
    with pytest.raises(modulora.AdapterError, match=r"'rtn-4bit'.*'rtn-2bit'.*allow_other_quantizer"):
        modulora.load_adapter(other_q, d)
    loaded = modulora.load_adapter(other_q, d, allow_other_quantizer=True)
    assert sum(isinstance(m, QuantizedLoraLinear) for m in loaded.modules()) == 14
    # an adapter PEFT wrote on its own carries no record: PEFT's own shape checks apply
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    torch.testing.assert_close(logits(modulora.load_adapter(base(), tmp_path), ids), logits(model, ids),
                               rtol=0, atol=0)


def test_bad_adapter_directories_and_models(trained, tmp_path):
    _, d = trained
    with pytest.raises(modulora.AdapterError, match="lacks"):
        modulora.load_adapter(base(), tmp_path)
    with pytest.raises(modulora.AdapterError, match="takes a PeftModel"):
        modulora.save_adapter(tiny_llama(), tmp_path / "a")
    with pytest.raises(modulora.AdapterError, match="takes a PeftModel"):
        modulora.save_adapter(base(), tmp_path / "b")
    dense_peft = peft.get_peft_model(tiny_llama(), lora())
    with pytest.raises(modulora.AdapterError, match="no quantized layers"):
        modulora.save_adapter(dense_peft, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_adapter_with_a_bad_shape_a_missing_module_or_a_corrupted_file(trained, tmp_path):
    _, d = trained
    for name in (ADAPTER_CONFIG, MODULORA_CONFIG):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    tensors = safetensors.torch.load_file(d / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    safetensors.torch.save_file({**tensors, key: torch.zeros(4, 32)}, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(modulora.AdapterError,
                       match=r"does not fit this model \(size mismatch for .*layers\.0\.self_attn\.q_proj\.lora_A"):
        modulora.load_adapter(base(), tmp_path)  # PEFT's own message, which names the module
    del tensors[key.replace("lora_A", "lora_B")], tensors[key]
    safetensors.torch.save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    with pytest.warns(UserWarning, match=r"missing adapter keys.*layers\.0\.self_attn\.q_proj"):
        modulora.load_adapter(base(), tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(modulora.AdapterError, match=f"{ADAPTER_WEIGHTS}.*truncated or corrupted"):
        modulora.load_adapter(base(), tmp_path)


def test_interrupted_adapter_save_keeps_previous(trained, tmp_path, monkeypatch):
    model, d = trained
    for name in os.listdir(d):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    other = modulora.load(tiny_llama(seed=1), "rtn-2bit", lora=lora(r=2))

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        modulora.save_adapter(other, tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before  # no staging folder either
