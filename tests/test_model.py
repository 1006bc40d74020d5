"""``modulora.load`` (quantize, or reload, + PEFT LoRA), ``save_quantized`` / ``from_pretrained``, the 0.1
checkpoint layout that still loads, and the errors of all three."""

from __future__ import annotations

import json
import os
import uuid
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import transformers.modeling_utils
from peft import LoraConfig, PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modulora
from modulora import ModuLoRAConfig, QuantizedLinear
from modulora_core import registry
from modulora_core.checkpoint import LEGACY_INDEX, LEGACY_WEIGHTS, checkpoint_kind
from modulora_core.files import tensors_digest
from modulora_core.peft_lora import QuantizedLoraLinear
from modulora_core.quantizer import Capabilities, Quantizer
from modulora_core.surgery import tied_aliases

BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
GROUPS = (("self_attn", BLOCK_LINEARS[:4]), ("mlp", BLOCK_LINEARS[4:]))
BLOCK_NAMES = sorted(f"model.layers.{i}.{p}.{n}" for i in range(2) for p, ns in GROUPS for n in ns)


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


def quantized_names(model: nn.Module) -> list[str]:
    """Names of the QuantizedLinear layers, as in the transformers model (PEFT's ``.base_layer`` left out)."""
    model = model.get_base_model() if isinstance(model, PeftModel) else model
    return sorted(n.removesuffix(".base_layer") for n, _ in modulora.iter_quantized_layers(model))


def randomize_lora(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in modulora.lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def same_packed(a: nn.Module, b: nn.Module) -> None:
    la, lb = dict(modulora.iter_quantized_layers(a)), dict(modulora.iter_quantized_layers(b))
    assert la.keys() == lb.keys() and la
    for n in la:
        assert la[n].packed.tensors.keys() == lb[n].packed.tensors.keys()
        for k, t in la[n].packed.tensors.items():
            assert torch.equal(t, lb[n].packed.tensors[k]), (n, k)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, base_dir) -> tuple[Path, nn.Module]:
    model = modulora.load(base_dir, "rtn-4bit", chunk_rows=32, lora=None)
    d = tmp_path_factory.mktemp("quant")
    modulora.save_quantized(model, d)
    return d, model


# -- load ---------------------------------------------------------------------------------------------------
def test_load_quantizes_every_block_linear_and_attaches_peft_lora(base_dir, ids):
    ref = logits(tiny_llama(), ids)
    model = modulora.load(base_dir, "rtn-4bit")
    assert isinstance(model, PeftModel)
    base = model.get_base_model()
    assert quantized_names(model) == BLOCK_NAMES
    assert type(base.lm_head) is nn.Linear and type(base.model.embed_tokens) is nn.Embedding
    assert base.lm_head.weight is base.model.embed_tokens.weight
    # PEFT's default LoRA: r=8, alpha=16 on every quantized module, the only trainable parameters
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (8, 16.0, 0.0)
    assert sorted(lora.target_modules) == sorted(BLOCK_LINEARS)
    assert sum(isinstance(m, QuantizedLoraLinear) for m in model.modules()) == 14
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"base_model.model.{n}.lora_{ab}.default.weight" for n in BLOCK_NAMES for ab in "AB"}
    assert len(modulora.lora_parameters(model)) == 28
    qc = base.config.quantization_config
    assert isinstance(qc, ModuLoRAConfig)
    assert (qc.preset, qc.family, qc.plugin, qc.plugin_version) == ("rtn-4bit", "rtn", "modulora-plugin-rtn", "0.1.0")
    assert qc.quantizer_config["bits"] == 4 and sorted(qc.modules) == BLOCK_NAMES

    out = logits(model, ids)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.1, rel  # B = 0: only the 4-bit quantization error
    two_bit = logits(modulora.load(tiny_llama(), "rtn-2bit", lora=None), ids)
    assert rel < (two_bit - ref).norm() / ref.norm()
    gen = model.generate(input_ids=ids[:1, :4], max_new_tokens=5, do_sample=False)
    assert gen.shape == (1, 9)


def test_load_lora_none_in_place_with_chunking_and_a_lora_config(ids):
    plain = logits(modulora.load(tiny_llama(), "rtn-3bit", lora=None), ids)
    dense = tiny_llama()
    base = modulora.load(dense, "rtn-3bit", chunk_rows=24, lora=None)
    assert base is dense and not isinstance(base, PeftModel)  # quantized in place
    assert not any(p.requires_grad for p in base.parameters())
    assert {m.chunk_rows for _, m in modulora.iter_quantized_layers(base)} == {24}
    torch.testing.assert_close(logits(base, ids), plain, rtol=1e-5, atol=1e-5)
    # quantization targets and LoRA targets are apart: all 14 quantized, LoRA on up_proj only
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["up_proj"])
    model = modulora.load(tiny_llama(), "rtn-3bit", chunk_rows=24, lora=lora)
    assert len(quantized_names(model)) == 14
    layer = model.get_base_model().model.layers[0].mlp.up_proj
    assert isinstance(layer, QuantizedLoraLinear) and layer.get_base_layer().chunk_rows == 24
    assert (layer.r["default"], layer.scaling["default"], layer.lora_A["default"].weight.shape) == (4, 2.0, (4, 64))
    assert isinstance(model.get_base_model().model.layers[0].mlp.down_proj, QuantizedLinear)
    torch.testing.assert_close(logits(model, ids), plain, rtol=1e-5, atol=1e-5)  # B = 0


def test_a_config_object_is_honoured_not_its_family_default(base_dir):
    from modulora_plugin_rtn import RTNConfig

    for model in (modulora.load(base_dir, RTNConfig(bits=3, group_size=32), lora=None),  # from_pretrained
                  modulora.load(tiny_llama(), RTNConfig(bits=3, group_size=32), lora=None)):  # an instance
        cfgs = {m.packed.config for _, m in modulora.iter_quantized_layers(model)}
        assert cfgs == {RTNConfig(bits=3, group_size=32)}
        assert model.config.quantization_config.quantizer_config["group_size"] == 32


@pytest.mark.parametrize(("targets", "expected"), [
    (["q_proj", "v_proj"], 4),
    (r"model\.layers\.0\..*_proj", 7),
    ("all-linear", 14),
    (["lm_head", "self_attn.o_proj"], 3),
])
def test_quantization_target_forms(targets, expected, ids):
    model = modulora.load(tiny_llama(), "rtn-8bit", targets=targets, lora=None)
    names = quantized_names(model)
    assert len(names) == expected
    assert ("lm_head" in names) == ("lm_head" in targets)
    assert isinstance(model.model.embed_tokens, nn.Embedding)
    assert logits(model, ids).shape == (2, 16, 128)
    if "lm_head" in names:  # a quantized head no longer shares the embedding
        assert model.config.tie_word_embeddings is False


def test_modules_to_not_convert_stay_dense():
    model = modulora.load(tiny_llama(), "rtn-4bit", modules_to_not_convert=["down_proj", "q_proj"], lora=None)
    assert len(quantized_names(model)) == 10
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert model.config.quantization_config.modules_to_not_convert == ["down_proj", "q_proj"]


def test_disabling_the_adapter_gives_the_base_back(ids):
    model = modulora.load(tiny_llama(), "rtn-4bit")
    base = logits(model, ids)
    randomize_lora(model)
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base)
    with model.disable_adapter():
        torch.testing.assert_close(logits(model, ids), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=0)


def test_training_lowers_the_loss(ids):
    torch.manual_seed(0)
    model = modulora.load(tiny_llama(), "rtn-4bit").train()
    opt = torch.optim.AdamW(modulora.lora_parameters(model), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=ids).loss
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
    packed = {n: t.clone() for n, t in model.named_buffers() if ".packed_" in n}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True)
    data = [{"input_ids": row, "labels": row} for row in ids]
    Trainer(model=model, args=args, train_dataset=data).train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert all(torch.equal(t, packed[n]) for n, t in model.named_buffers() if n in packed)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


# -- save_quantized / from_pretrained --------------------------------------------------------------------
def test_save_quantized_and_from_pretrained_round_trip_without_requantizing(saved, ids, monkeypatch):
    d, model = saved
    assert {"config.json", "model.safetensors"} <= set(os.listdir(d))
    assert not [n for n in os.listdir(d) if n.startswith(".modulora-tmp")]
    assert checkpoint_kind(d) == "native"
    qc = json.loads((d / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["preset"], qc["plugin_version"], qc["chunk_rows"]) == \
        ("modulora", "rtn-4bit", "0.1.0", 32)
    assert "calibration" not in qc
    rec = qc["modules"]["model.layers.1.mlp.down_proj"]
    assert (rec["shape"], rec["dtype"], rec["has_bias"]) == ([64, 128], "float32", False)
    with safetensors.safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert "lm_head.weight" not in keys and "model.layers.1.mlp.down_proj.packed_codes" in keys
    assert not [k for k in keys if k.endswith("_proj.weight")]  # nothing dense of a quantized layer

    def no_quantizing(*a, **k):
        raise AssertionError("reloading must not quantize")

    monkeypatch.setattr(Quantizer, "quantize_weight", no_quantizing)
    for loaded in (AutoModelForCausalLM.from_pretrained(d), modulora.load(d, lora=None),
                   modulora.load(str(d), "rtn-4bit", lora=None)):
        assert not isinstance(loaded, PeftModel)
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
        assert {(m.preset, m.chunk_rows) for _, m in modulora.iter_quantized_layers(loaded)} == {("rtn-4bit", 32)}
        same_packed(model, loaded)
        assert not any(p.requires_grad for p in loaded.parameters())
        torch.testing.assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)
    peft_model = modulora.load(d, chunk_rows=8)  # PEFT LoRA on the reloaded base, chunking changed
    assert isinstance(peft_model, PeftModel) and len(modulora.lora_parameters(peft_model)) == 28
    assert {m.chunk_rows for _, m in modulora.iter_quantized_layers(peft_model)} == {8}
    torch.testing.assert_close(logits(peft_model, ids), logits(model, ids), rtol=1e-6, atol=1e-6)


def test_save_quantized_of_a_peft_model_writes_the_base_with_bias_untied(tmp_path, ids):
    dense = tiny_llama(tie=False)
    dense.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(64))
    model = modulora.load(dense, "rtn-8bit")
    randomize_lora(model)
    with model.disable_adapter():
        want = logits(model, ids)
    modulora.save_quantized(model, tmp_path)  # the adapters are left out
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    assert not [k for k in keys if "lora_" in k or "base_layer" in k]
    loaded = modulora.load(tmp_path, chunk_rows=16, lora=None)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantizedLinear) and q.bias is not None and q.chunk_rows == 16
    assert loaded.model.layers[1].self_attn.q_proj.bias is None
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(loaded, ids), want, rtol=1e-6, atol=1e-6)


def test_saving_needs_a_quantized_unmerged_model(tmp_path):
    with pytest.raises(modulora.CheckpointError, match="no quantized layers"):
        modulora.save_quantized(tiny_llama(), tmp_path / "dense")
    model = modulora.load(tiny_llama(), "rtn-4bit")
    model.merge_adapter()
    with pytest.raises(modulora.CheckpointError, match="merged adapters"):
        modulora.save_quantized(model, tmp_path / "merged")
    model.unmerge_adapter()
    modulora.save_quantized(model, tmp_path / "unmerged")
    assert checkpoint_kind(tmp_path / "unmerged") == "native"


def test_interrupted_save_leaves_previous_checkpoint(saved, tmp_path, ids, monkeypatch):
    d = _copy(saved[0], tmp_path / "ck")
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}
    other = modulora.load(tiny_llama(seed=1), "rtn-2bit", lora=None)

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        modulora.save_quantized(other, d)
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before  # no staging folder left either
    monkeypatch.undo()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        torch.testing.assert_close(logits(modulora.load(d, lora=None), ids), logits(saved[1], ids), rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------------------------------
def test_unknown_quantizer_lists_presets(tmp_path):
    with pytest.raises(modulora.UnknownQuantizerError, match="rtn-4bit"):
        modulora.load(tiny_llama(), "rtn-5bit")
    with pytest.raises(modulora.UnknownQuantizerError, match="Pass preset=.*rtn-2bit"):
        modulora.load(tiny_llama())
    with pytest.raises(modulora.UnknownQuantizerError, match="nowhere.*not a quantized checkpoint"):
        modulora.load(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="lora must be a peft.LoraConfig"):
        modulora.load(tiny_llama(), "rtn-4bit", lora="big")


def test_no_matching_targets_names_request_and_choices():
    with pytest.raises(modulora.TargetModulesError, match=r"(?s)nope.*q_proj"):
        modulora.load(tiny_llama(), "rtn-4bit", targets=["nope"])
    with pytest.raises(modulora.TargetModulesError, match="regex"):
        modulora.load(tiny_llama(), "rtn-4bit", targets="([")
    with pytest.raises(modulora.ModuLoRAError, match="already has quantized layers"):
        modulora.load(modulora.load(tiny_llama(), "rtn-4bit", lora=None), "rtn-4bit")


class _CalibratedRTN(type(registry.get_preset("rtn").quantizer)):
    """RTN that claims to need a Hessian (and checks it got one), to test the calibration plumbing."""

    name = "rtn"

    def capabilities(self, config):
        return Capabilities(**{**super().capabilities(config).model_dump(), "needs_calibration": True})


def test_calibration_required_or_ignored(monkeypatch, ids):
    with pytest.warns(UserWarning, match="needs no calibration"):
        modulora.load(tiny_llama(), "rtn-4bit", calibration=[ids], lora=None)
    fam = registry.get_family("rtn")
    monkeypatch.setitem(registry.get_registry().families, "rtn",
                        registry.Family(_CalibratedRTN(), fam.plugin, fam.distribution, fam.version))
    with pytest.raises(modulora.CalibrationError, match="needs calibration"):
        modulora.load(tiny_llama(), "rtn-4bit")
    dense = tiny_llama()
    hessians = {n: torch.eye(m.in_features) for n, m in dense.named_modules() if n.endswith("_proj")}
    model = modulora.load(dense, "rtn-4bit", calibration=hessians, lora=None)
    assert len(quantized_names(model)) == 14
    with pytest.raises(modulora.CalibrationError, match="no Hessian for"):
        modulora.load(tiny_llama(), "rtn-4bit", calibration={"model.layers.0.mlp.up_proj": torch.eye(64)})


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for n in os.listdir(src):
        (dst / n).write_bytes((src / n).read_bytes())
    return dst


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupted_weights_file_is_a_checkpoint_error(saved, tmp_path, damage):
    d = _copy(saved[0], tmp_path / "ck")
    p = d / "model.safetensors"
    b = p.read_bytes()
    p.write_bytes({"truncate": b[: len(b) // 2], "header": b"\xff" * 16 + b[16:]}[damage])
    with pytest.raises(modulora.CheckpointError, match="truncated or corrupted"):
        modulora.load(d)


@pytest.mark.parametrize(("edit", "match"), [
    ({"format_version": 2}, "format_version 2"),
    ({"plugin_version": "7.0.0"}, "another major version"),
    ({"quantizer_config": {"family": "nosuch"}, "plugin": "modulora-plugin-nosuch"},
     "family 'nosuch'.*pip install modulora-plugin-nosuch"),
])
def test_incompatible_checkpoint_records(saved, tmp_path, edit, match):
    d = _copy(saved[0], tmp_path / "ck")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"].update(edit)
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(modulora.CheckpointError, match=match):
        modulora.load(d)
    with pytest.raises(modulora.CheckpointError, match=match):
        AutoModelForCausalLM.from_pretrained(d)


def test_minor_plugin_version_difference_loads(saved, tmp_path, ids):
    d = _copy(saved[0], tmp_path / "ck")
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"]["plugin_version"] = "0.3.1"
    (d / "config.json").write_text(json.dumps(config))
    torch.testing.assert_close(logits(modulora.load(d, lora=None), ids), logits(saved[1], ids), rtol=0, atol=0)


def test_quantizer_mismatch_is_refused(saved, tmp_path):
    with pytest.raises(modulora.CheckpointError, match=r"'rtn-4bit'.*'rtn-2bit'.*dense weights are gone"):
        modulora.load(saved[0], "rtn-2bit")


# -- the modulora 0.1 layout: still loads, with a warning, and converts --------------------------------------
def write_legacy(model: nn.Module, d: Path, *, chunk_rows: int | None = None) -> Path:
    """What modulora 0.1's ``save_quantized`` wrote for ``model`` (a quantized transformers model):
    ``config.json`` without a quantization_config, ``modulora_quant.json`` (the index: per module its family,
    preset, config, plugin record and packed tensor names; tied aliases; a SHA-256 of the weights) and
    ``modulora_model.safetensors`` (every tensor but tied aliases, packed ones as ``<module>.packed_<name>``,
    the checkpoint id in its metadata)."""
    d.mkdir(parents=True, exist_ok=True)
    tied = tied_aliases(model)
    tensors = {k: t.detach().contiguous() for k, t in model.state_dict().items() if k not in tied}
    modules = {}
    for name, layer in modulora.iter_quantized_layers(model):
        m = layer.quant_metadata()
        modules[name] = {"quantizer": m["preset"], "family": m["family"], "config": m["config"],
                         "plugin": "modulora-plugin-rtn", "plugin_version": m["plugin_version"],
                         "format_version": m["format_version"], "shape": m["shape"], "dtype": m["dtype"],
                         "has_bias": m["has_bias"], "extra": m["extra"], "tensors": sorted(layer.packed.tensors)}
    index = {"format": "modulora-quantized", "layout_version": 1, "modulora_version": "0.1.0",
             "checkpoint_id": uuid.uuid4().hex, "weights_file": LEGACY_WEIGHTS,
             "model_type": model.config.model_type, "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0},
             "chunk_rows": chunk_rows, "tied": tied, "modules": modules, "sha256": tensors_digest(tensors)}
    safetensors.torch.save_file(tensors, str(d / LEGACY_WEIGHTS), metadata={
        "format": "pt", "modulora_version": "0.1.0", "modulora_checkpoint_id": index["checkpoint_id"],
        "modulora_index": json.dumps(index, sort_keys=True)})
    (d / LEGACY_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    (d / "config.json").write_text(json.dumps(config, default=str))
    return d


@pytest.fixture(scope="module")
def legacy(tmp_path_factory, saved) -> Path:
    return write_legacy(saved[1], tmp_path_factory.mktemp("legacy"), chunk_rows=32)


def test_legacy_checkpoint_loads_with_a_warning_and_converts(legacy, saved, tmp_path, ids, monkeypatch):
    _, model = saved
    assert checkpoint_kind(legacy) == "legacy"

    def no_quantizing(*a, **k):
        raise AssertionError("loading a 0.1 checkpoint must not quantize")

    monkeypatch.setattr(Quantizer, "quantize_weight", no_quantizing)
    with pytest.warns(UserWarning, match="0.1 layout.*save_quantized"):
        old = modulora.load(legacy, lora=None)
    assert old.lm_head.weight is old.model.embed_tokens.weight
    assert {(m.preset, m.chunk_rows) for _, m in modulora.iter_quantized_layers(old)} == {("rtn-4bit", 32)}
    assert isinstance(old.config.quantization_config, ModuLoRAConfig)
    same_packed(model, old)
    torch.testing.assert_close(logits(old, ids), logits(model, ids), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="0.1 layout"):
        peft_model = modulora.load(legacy, "rtn-4bit", chunk_rows=8)
    assert isinstance(peft_model, PeftModel) and len(modulora.lora_parameters(peft_model)) == 28
    assert {m.chunk_rows for _, m in modulora.iter_quantized_layers(peft_model)} == {8}
    with pytest.warns(UserWarning, match="0.1 layout"), \
            pytest.raises(modulora.CheckpointError, match=r"'rtn-4bit'.*'rtn-2bit'"):
        modulora.load(legacy, "rtn-2bit")
    modulora.save_quantized(old, tmp_path / "new")  # converted: the current format, no warning any more
    assert checkpoint_kind(tmp_path / "new") == "native"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        new = AutoModelForCausalLM.from_pretrained(tmp_path / "new")
    same_packed(model, new)
    torch.testing.assert_close(logits(new, ids), logits(model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("damage", ["truncate", "header", "data"])
def test_corrupted_legacy_weights_file_is_named(legacy, tmp_path, damage):
    d = _copy(legacy, tmp_path / "ck")
    p = d / LEGACY_WEIGHTS
    b = p.read_bytes()
    b = {"truncate": b[: len(b) // 2], "header": b"\xff" * 16 + b[16:],
         "data": b[: len(b) // 2] + bytes(64) + b[len(b) // 2 + 64:]}[damage]
    p.write_bytes(b)
    with pytest.raises(modulora.CheckpointError, match=LEGACY_WEIGHTS):
        modulora.load(d)


@pytest.mark.parametrize(("edit", "match"), [
    ({"format_version": 2}, "format_version 2"),
    ({"plugin_version": "7.0.0"}, "another major version"),
    ({"family": "nosuch"}, "family 'nosuch'"),
])
def test_incompatible_legacy_index_entries(legacy, tmp_path, edit, match):
    d = _copy(legacy, tmp_path / "ck")
    index = json.loads((d / LEGACY_INDEX).read_text())
    index["modules"]["model.layers.0.mlp.up_proj"].update(edit)
    (d / LEGACY_INDEX).write_text(json.dumps(index))
    with pytest.raises(modulora.CheckpointError, match=match):
        modulora.load(d)


def test_legacy_checkpoint_with_missing_or_mismatched_files(legacy, tmp_path):
    d = _copy(legacy, tmp_path / "nocfg")
    (d / "config.json").unlink()
    with pytest.raises(modulora.CheckpointError, match="config.json"):
        modulora.load(d)
    d = _copy(legacy, tmp_path / "other-save")
    index = json.loads((d / LEGACY_INDEX).read_text())
    index["checkpoint_id"] = uuid.uuid4().hex  # the index of another save than the weights'
    (d / LEGACY_INDEX).write_text(json.dumps(index))
    with pytest.raises(modulora.CheckpointError, match="different saves"):
        modulora.load(d)
