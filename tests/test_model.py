"""modulora_core.model: quantize-and-swap (load), save_quantized / load_quantized, and their errors."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import modulora
from modulora_core import registry
from modulora_core.builtin_format import QUANT_INDEX, WEIGHTS_FILE
from modulora_core.quantizer import Capabilities, Quantizer

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def tiny_llama(seed: int = 0, tie: bool = True) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("base")
    tiny_llama().save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modulora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base_dir) -> tuple[Path, nn.Module]:
    model = modulora.load(base_dir, "rtn-4bit", chunk_rows=32)
    d = tmp_path_factory.mktemp("quant")
    modulora.save_quantized(model, d)
    return d, model


# -- load ---------------------------------------------------------------------------------------------------
def test_load_swaps_every_block_linear_and_freezes_the_rest(base_dir, ids):
    ref = logits(tiny_llama(), ids)
    model = modulora.load(base_dir, "rtn-4bit")
    layers = dict(modulora.iter_modulora_layers(model))
    groups = (("self_attn", BLOCK_LINEARS[:4]), ("mlp", BLOCK_LINEARS[4:]))
    want = [f"model.layers.{i}.{p}.{n}" for i in range(2) for p, ns in groups for n in ns]
    assert sorted(layers) == sorted(want)
    assert type(model.lm_head) is nn.Linear and type(model.model.embed_tokens) is nn.Embedding
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    assert len(modulora.lora_parameters(model)) == 28
    info = model.modulora_info
    assert (info.quantizer, info.family, info.plugin_version) == ("rtn-4bit", "rtn", "0.1.0")
    assert json.loads(info.config)["bits"] == 4 and info.lora == modulora.LoraConfig()

    out = logits(model, ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel  # B = 0: only the 4-bit quantization error
    two_bit = logits(modulora.load(tiny_llama(), "rtn-2bit"), ids)
    assert rel < (two_bit - ref).norm() / ref.norm()
    gen = model.generate(ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_load_instance_in_place_with_chunking_and_lora_config(ids):
    plain = logits(modulora.load(tiny_llama(), "rtn-3bit"), ids)
    dense = tiny_llama()
    lora = modulora.LoraConfig(r=4, alpha=8, dropout=0.1)
    model = modulora.load(dense, "rtn-3bit", chunk_rows=24, lora=lora)
    assert model is dense
    layer = model.model.layers[0].mlp.up_proj
    assert (layer.chunk_rows, layer.r, layer.scaling, layer.lora_A.weight.shape) == (24, 4, 2.0, (4, 64))
    torch.testing.assert_close(logits(model, ids), plain, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj", "v_proj"], 4),
    (r"model\.layers\.0\..*_proj", 7),
    ("all-linear", 14),
    (["lm_head", "self_attn.o_proj"], 3),
])
def test_target_modules_forms(targets, expected, ids):
    model = modulora.load(tiny_llama(), "rtn-8bit", lora=modulora.LoraConfig(target_modules=targets))
    names = [n for n, _ in modulora.iter_modulora_layers(model)]
    assert len(names) == expected
    assert ("lm_head" in names) == ("lm_head" in targets)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert logits(model, ids).shape == (2, 16, 128)
    if "lm_head" in names:  # a quantized head no longer shares the embedding
        assert model.config.tie_word_embeddings is False


def test_set_adapter_enabled_gives_the_base_back(ids):
    model = modulora.load(tiny_llama(), "rtn-4bit")
    base = logits(model, ids)
    randomize_lora(model)
    assert not torch.allclose(logits(model, ids), base)
    modulora.set_adapter_enabled(model, False)
    torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    modulora.set_adapter_enabled(model, True)
    assert not torch.allclose(logits(model, ids), base)


def test_training_lowers_the_loss(ids):
    torch.manual_seed(0)
    model = modulora.load(tiny_llama(), "rtn-4bit").train()
    opt = torch.optim.AdamW(modulora.lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0], losses
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


def test_hf_trainer_trains_only_lora(tmp_path, ids):
    from transformers import Trainer, TrainingArguments

    model = modulora.load(tiny_llama(), "rtn-4bit")
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    data = [{"input_ids": row, "labels": row} for row in ids]
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


# -- save_quantized / load_quantized ------------------------------------------------------------------------
def test_save_load_quantized_round_trip_without_requantizing(saved, ids, monkeypatch):
    d, model = saved
    assert {"config.json", QUANT_INDEX, WEIGHTS_FILE} <= set(os.listdir(d))
    assert not [n for n in os.listdir(d) if n.startswith(".modulora-tmp")]
    index = json.loads((d / QUANT_INDEX).read_text())
    entry = index["modules"]["model.layers.1.mlp.down_proj"]
    assert (entry["quantizer"], entry["family"], entry["plugin_version"], entry["format_version"]) == \
        ("rtn-4bit", "rtn", "0.1.0", 1)
    assert (entry["shape"], entry["dtype"], entry["has_bias"]) == ([64, 128], "float32", False)
    assert index["tied"] == {"lm_head.weight": "model.embed_tokens.weight"}
    with safetensors.safe_open(str(d / WEIGHTS_FILE), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # noqa: SIM118
        assert json.loads(f.metadata()["modulora_index"])["modules"] == index["modules"]

    def no_quantizing(*a, **k):
        raise AssertionError("load_quantized must not quantize")

    monkeypatch.setattr(Quantizer, "quantize_weight", no_quantizing)
    for loaded in (modulora.load_quantized(d), modulora.load(d), modulora.load(str(d), "rtn-4bit")):
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert loaded.modulora_info.quantizer == "rtn-4bit" and loaded.modulora_info.chunk_rows == 32
        a, b = dict(modulora.iter_modulora_layers(model)), dict(modulora.iter_modulora_layers(loaded))
        assert a.keys() == b.keys()
        for n in a:
            for k, t in a[n].packed.tensors.items():
                assert torch.equal(t, b[n].packed.tensors[k]), (n, k)
        assert {n for n, p in loaded.named_parameters() if p.requires_grad} == \
            {n for n, p in model.named_parameters() if p.requires_grad}
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_load_quantized_with_bias_and_other_lora(tmp_path, ids):
    dense = tiny_llama(tie=False)
    dense.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(64))
    model = modulora.load(dense, "rtn-8bit")
    modulora.save_quantized(model, tmp_path)
    loaded = modulora.load_quantized(tmp_path, lora=modulora.LoraConfig(r=2), chunk_rows=16)
    q = loaded.model.layers[0].self_attn.q_proj
    assert q.bias is not None and q.r == 2 and q.chunk_rows == 16
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=1e-6, atol=1e-6)


# -- errors -------------------------------------------------------------------------------------------------
def test_unknown_quantizer_lists_presets():
    with pytest.raises(modulora.UnknownQuantizerError, match="rtn-4bit"):
        modulora.load(tiny_llama(), "rtn-5bit")
    with pytest.raises(modulora.UnknownQuantizerError, match="Pass quantizer=.*rtn-2bit"):
        modulora.load(tiny_llama())


def test_no_matching_targets_names_request_and_choices():
    with pytest.raises(modulora.TargetModulesError, match=r"(?s)nope.*q_proj"):
        modulora.load(tiny_llama(), "rtn-4bit", lora=modulora.LoraConfig(target_modules=["nope"]))
    with pytest.raises(modulora.TargetModulesError, match="regex"):
        modulora.load(tiny_llama(), "rtn-4bit", lora=modulora.LoraConfig(target_modules="(["))


class _CalibratedRTN(type(registry.get_quantizer("rtn").quantizer)):
    """RTN that claims to need a Hessian (and checks it got one), to test the calibration plumbing."""

    name = "rtn"

    def capabilities(self, config):
        return Capabilities(**{**super().capabilities(config).model_dump(), "needs_calibration": True})


def test_calibration_required_or_ignored(monkeypatch, ids):
    with pytest.warns(UserWarning, match="needs no calibration"):
        modulora.load(tiny_llama(), "rtn-4bit", calibration=[ids])
    fam = registry.get_family("rtn")
    monkeypatch.setitem(registry.get_registry().families, "rtn",
                        registry.Family(_CalibratedRTN(), fam.plugin, fam.distribution, fam.version))
    with pytest.raises(modulora.CalibrationError, match="needs calibration"):
        modulora.load(tiny_llama(), "rtn-4bit")
    dense = tiny_llama()
    hessians = {n: torch.eye(m.in_features) for n, m in dense.named_modules() if n.endswith("_proj")}
    model = modulora.load(dense, "rtn-4bit", calibration=hessians)
    assert len(list(modulora.iter_modulora_layers(model))) == 14


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for n in os.listdir(src):
        (dst / n).write_bytes((src / n).read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncate", "header", "data"])
def test_corrupted_weights_file_is_named(saved, tmp_path, damage):
    d = _copy(saved[0], tmp_path / "ck")
    p = d / WEIGHTS_FILE
    b = p.read_bytes()
    b = {"truncate": b[: len(b) // 2], "header": b"\xff" * 16 + b[16:],
         "data": b[: len(b) // 2] + bytes(64) + b[len(b) // 2 + 64:]}[damage]
    p.write_bytes(b)
    with pytest.raises(modulora.CheckpointError, match=WEIGHTS_FILE):
        modulora.load(d)


@pytest.mark.parametrize(("edit", "match"), [
    ({"format_version": 2}, "format_version 2"),
    ({"plugin_version": "7.0.0"}, "another major version"),
    ({"family": "nosuch"}, "family 'nosuch'"),
])
def test_incompatible_index_entries(saved, tmp_path, edit, match):
    d = _copy(saved[0], tmp_path / "ck")
    index = json.loads((d / QUANT_INDEX).read_text())
    index["modules"]["model.layers.0.mlp.up_proj"].update(edit)
    (d / QUANT_INDEX).write_text(json.dumps(index))
    with pytest.raises(modulora.CheckpointError, match=match):
        modulora.load_quantized(d)


def test_minor_plugin_version_difference_warns(saved, tmp_path):
    d = _copy(saved[0], tmp_path / "ck")
    index = json.loads((d / QUANT_INDEX).read_text())
    for e in index["modules"].values():
        e["plugin_version"] = "0.3.1"
    (d / QUANT_INDEX).write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="0.3.1"):
        modulora.load_quantized(d)


def test_quantizer_mismatch_and_missing_files(saved, tmp_path):
    with pytest.raises(modulora.CheckpointError, match=r"'rtn-4bit'.*'rtn-2bit'"):
        modulora.load(saved[0], "rtn-2bit")
    d = _copy(saved[0], tmp_path / "ck")
    (d / "config.json").unlink()
    with pytest.raises(modulora.CheckpointError, match="config.json"):
        modulora.load_quantized(d)
    with pytest.raises(modulora.CheckpointError, match="not a directory"):
        modulora.load_quantized(tmp_path / "nowhere")


def test_interrupted_save_leaves_previous_checkpoint(saved, tmp_path, ids, monkeypatch):
    d = _copy(saved[0], tmp_path / "ck")
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    other = modulora.load(tiny_llama(seed=1), "rtn-2bit")

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        modulora.save_quantized(other, d)
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before  # no staging folder left either
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(logits(modulora.load(d), ids), logits(saved[1], ids), rtol=0, atol=0)
