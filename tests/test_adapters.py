"""modulora_core.adapters: PEFT-format adapters (stock PEFT loads them), dequantize / merge, and errors."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modulora
from modulora_core.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULORA_CONFIG


def tiny_llama(seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, ids) -> tuple[nn.Module, Path]:
    """A ModuLoRA model trained 30 steps on one batch, and its saved adapter."""
    torch.manual_seed(0)
    model = modulora.load(tiny_llama(), "rtn-4bit", lora=modulora.LoraConfig(r=4, alpha=8)).train()
    opt = torch.optim.AdamW(modulora.lora_parameters(model), lr=1e-2)
    first = None
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.85 * first
    model.eval()
    d = tmp_path_factory.mktemp("adapter")
    modulora.save_adapter(model, d)
    return model, d


def fresh(r: int = 4, **kw) -> nn.Module:
    torch.manual_seed(123)  # LoRA A's init differs from the trained model's: load_adapter must overwrite it
    return modulora.load(tiny_llama(**kw), "rtn-4bit", lora=modulora.LoraConfig(r=r, alpha=8))


def test_adapter_files_are_peft_format(trained):
    model, d = trained
    assert {ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODULORA_CONFIG} <= set(os.listdir(d))
    cfg = json.loads((d / ADAPTER_CONFIG).read_text())
    assert (cfg["peft_type"], cfg["task_type"], cfg["r"], cfg["lora_alpha"], cfg["bias"]) == \
        ("LORA", "CAUSAL_LM", 4, 8.0, "none")
    assert sorted(cfg["target_modules"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    with safetensors.safe_open(str(d / ADAPTER_WEIGHTS), "pt") as f:
        keys = set(f.keys())
        a = f.get_tensor("base_model.model.model.layers.1.mlp.down_proj.lora_A.weight")
    assert len(keys) == 28 and a.shape == (4, 128)
    ours = json.loads((d / MODULORA_CONFIG).read_text())
    assert ours["quantizer"] == "rtn-4bit" and ours["base_model"]["hidden_size"] == 64
    assert len(ours["base_model"]["modules"]) == 14


def test_adapter_reloads_into_fresh_model(trained, ids):
    model, d = trained
    other = fresh()
    assert not torch.allclose(logits(other, ids), logits(model, ids))
    modulora.load_adapter(other, d)
    torch.testing.assert_close(logits(other, ids), logits(model, ids), rtol=0, atol=0)


def test_stock_peft_loads_adapter_on_dequantized_base(trained, ids, tmp_path):
    model, d = trained
    want = logits(model, ids)
    peft_model = PeftModel.from_pretrained(modulora.dequantize(model), d).eval()
    torch.testing.assert_close(logits(peft_model, ids), want, rtol=1e-5, atol=1e-5)
    merged = modulora.dequantize(model, merge=True)
    assert not any(isinstance(m, modulora.ModuLoRALinear) for m in merged.modules())
    torch.testing.assert_close(logits(merged, ids), want, rtol=1e-5, atol=1e-5)
    merged.save_pretrained(tmp_path)  # a plain dense checkpoint
    again = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert again.lm_head.weight is again.model.embed_tokens.weight
    torch.testing.assert_close(logits(again, ids), want, rtol=1e-5, atol=1e-5)


def test_dequantize_without_merge_is_the_base(trained, ids):
    model, _ = trained
    dense = modulora.dequantize(model)
    assert dense is not model and type(dense) is type(model)
    assert all(p.device.type == "cpu" for p in dense.parameters())
    modulora.set_adapter_enabled(model, False)
    try:
        torch.testing.assert_close(logits(dense, ids), logits(model, ids), rtol=1e-5, atol=1e-5)
    finally:
        modulora.set_adapter_enabled(model, True)
    layer = model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(dense.model.layers[0].self_attn.q_proj.weight, layer.dense_weight())


def test_partial_targets_written_as_regex_when_leaves_are_ambiguous(tmp_path, ids):
    targets = r"model\.layers\.0\.self_attn\.q_proj|model\.layers\.1\.mlp\.up_proj"
    model = modulora.load(tiny_llama(), "rtn-4bit", lora=modulora.LoraConfig(target_modules=targets))
    with torch.no_grad():
        for p in modulora.lora_parameters(model):
            p.normal_(0, 0.1)
    modulora.save_adapter(model, tmp_path)
    written = json.loads((tmp_path / ADAPTER_CONFIG).read_text())["target_modules"]
    assert isinstance(written, str)
    assert re.fullmatch(written, "model.layers.0.self_attn.q_proj")
    assert not re.fullmatch(written, "model.layers.1.self_attn.q_proj")
    peft_model = PeftModel.from_pretrained(modulora.dequantize(model), tmp_path).eval()
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_adapter_errors(trained, tmp_path):
    _, d = trained
    with pytest.raises(modulora.AdapterError, match="rank r=4 .* rank is 8"):
        modulora.load_adapter(fresh(r=8), d)
    with pytest.raises(modulora.AdapterError, match="another base model.*num_hidden_layers"):
        modulora.load_adapter(fresh(layers=3), d)
    other_q = modulora.load(tiny_llama(), "rtn-2bit", lora=modulora.LoraConfig(r=4, alpha=8))
    with pytest.raises(modulora.AdapterError, match=r"'rtn-4bit'.*'rtn-2bit'"):
        modulora.load_adapter(other_q, d)
    modulora.load_adapter(other_q, d, allow_other_quantizer=True)
    with pytest.raises(modulora.AdapterError, match="lacks"):
        modulora.load_adapter(fresh(), tmp_path)
    with pytest.raises(modulora.AdapterError, match="no ModuLoRA layers"):
        modulora.save_adapter(tiny_llama(), tmp_path)


def test_adapter_with_missing_module_or_bad_shape(trained, tmp_path):
    _, d = trained
    for name in (ADAPTER_CONFIG, MODULORA_CONFIG):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    tensors = safetensors.torch.load_file(d / ADAPTER_WEIGHTS)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    safetensors.torch.save_file({**tensors, key: torch.zeros(4, 32)}, tmp_path / ADAPTER_WEIGHTS)
    with pytest.raises(modulora.AdapterError, match=r"q_proj: adapter has lora_A \(4, 32\)"):
        modulora.load_adapter(fresh(), tmp_path)
    del tensors[key.replace("lora_A", "lora_B")], tensors[key]
    safetensors.torch.save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    (tmp_path / MODULORA_CONFIG).unlink()  # a plain PEFT adapter: only the weights are checked
    with pytest.raises(modulora.AdapterError, match="without adapter weights.*layers.0.self_attn.q_proj"):
        modulora.load_adapter(fresh(), tmp_path)
    (tmp_path / ADAPTER_WEIGHTS).write_bytes(b"\x00" * 10)
    with pytest.raises(modulora.AdapterError, match=ADAPTER_WEIGHTS):
        modulora.load_adapter(fresh(), tmp_path)


def test_interrupted_adapter_save_keeps_previous(trained, tmp_path, monkeypatch):
    model, d = trained
    for name in os.listdir(d):
        (tmp_path / name).write_bytes((d / name).read_bytes())
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        modulora.save_adapter(fresh(), tmp_path)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before
