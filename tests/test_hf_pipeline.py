"""The Hugging Face pipeline a QLoRA user already has, on every first-party quantizer:
``from_pretrained(quantization_config=ModuLoRAConfig(...))`` -> ``peft.get_peft_model`` -> ``Trainer``."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

import modulora
from modulora import ModuLoRAConfig, QuantizedLinear
from modulora.finetune.data import stdlib_docstrings
from modulora.finetune.tiny import tiny_llama_dir
from modulora_core.peft_lora import QuantizedLoraLinear

pytestmark = pytest.mark.usefixtures("one_thread")

PRESETS = ["rtn-4bit", "nf4", "optq-4bit", "quip#-2bit", "hqq-4bit"]
N_LINEARS = 14  # 2 blocks x (q, k, v, o, gate, up, down)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "llama", layers=2, hidden=64)


@pytest.fixture(scope="module")
def tokens(tiny):
    """Real text (standard-library docstrings), tokenized by the model's tokenizer: ``[n, 64]`` ids."""
    tok = AutoTokenizer.from_pretrained(tiny)
    text = "\n\n".join(d.doc for d in stdlib_docstrings()[:200])
    ids = torch.tensor(tok(text)["input_ids"][: 64 * 48]).view(48, 64)
    return ids


def quantized(tiny, preset, tokens, **kw):
    cal = tokens[:16] if preset.startswith(("optq", "quip")) else None
    return AutoModelForCausalLM.from_pretrained(
        tiny, dtype=torch.float32, quantization_config=ModuLoRAConfig(preset, calibration=cal, **kw))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("preset", PRESETS)
def test_from_pretrained_peft_trainer(tiny, tokens, tmp_path, preset):
    model = quantized(tiny, preset, tokens)
    assert sum(isinstance(m, QuantizedLinear) for m in model.modules()) == N_LINEARS
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    dense_peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), copy.deepcopy(cfg))
    assert peft_model.get_nb_trainable_parameters()[0] == dense_peft.get_nb_trainable_parameters()[0]
    assert all(p.requires_grad == ("lora_" in n) for n, p in peft_model.named_parameters())

    data = [{"input_ids": t, "labels": t} for t in tokens[16:]]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=20, per_device_train_batch_size=4,
                             learning_rate=5e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4, losses
    # every targeted linear is still packed, under PEFT's LoRA layer, after training
    wrapped = [m for m in peft_model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == 4 and all(isinstance(m.get_base_layer(), QuantizedLinear) for m in wrapped)
    assert sum(isinstance(m, QuantizedLinear) for m in peft_model.modules()) == N_LINEARS


def _dense_reference(peft_model, cfg):
    """The same DoRA model over the materialized weights, in float64."""
    dense = modulora.dequantize(copy.deepcopy(peft_model).unload()).double()
    ref = get_peft_model(dense, copy.deepcopy(cfg))
    ours = {k: v.double() for k, v in peft_model.state_dict().items() if "lora_" in k}
    missing, unexpected = ref.load_state_dict(ours, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    return ref


@pytest.mark.parametrize("preset", PRESETS)
def test_dora_matches_float64_dense_reference(tiny, tokens, preset):
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                     init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(quantized(tiny, preset, tokens), cfg)
    ref = _dense_reference(peft_model, cfg)
    ids = tokens[:2, :32]
    out = peft_model(ids, labels=ids)
    out.loss.backward()
    out_ref = ref(ids, labels=ids)
    out_ref.loss.backward()
    assert rel(out.logits, out_ref.logits) < 1e-5
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    grads_ref = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
    assert grads.keys() == grads_ref.keys() and any("magnitude" in n for n in grads)
    for n in grads:
        assert rel(grads[n], grads_ref[n]) < 1e-5, n


def test_no_dense_weight_kept_for_backward(tiny, tokens):
    """LoRA and DoRA with dropout on: no tensor autograd saves between forward and backward is a
    materialized base weight (PEFT's own DoRA-with-dropout path would save W for ``F.linear(x, W)``)."""
    model = quantized(tiny, "rtn-4bit", tokens)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj"], use_dora=True, lora_dropout=0.1,
                     task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg).train()
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        loss = peft_model(tokens[:2, :32], labels=tokens[:2, :32]).loss
    weights = [m.dequantize() for m in model.modules() if isinstance(m, QuantizedLinear)]
    kept = [tuple(t.shape) for t in saved for w in weights
            if t.shape in (w.shape, w.T.shape) and (torch.equal(t, w) or torch.equal(t, w.T))]
    assert not kept, kept
    loss.backward()


def test_two_adapters_switch_and_disable(tiny, tokens):
    base = quantized(tiny, "nf4", tokens)
    ids = tokens[:2, :32]
    with torch.no_grad():
        base_logits = base(ids).logits
    torch.manual_seed(1)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
                        adapter_name="a")
    pm.add_adapter("b", LoraConfig(r=2, target_modules=["o_proj"], init_lora_weights=False))
    with torch.no_grad():
        pm.set_adapter("a")
        out_a = pm(ids).logits
        pm.set_adapter("b")
        out_b = pm(ids).logits
        with pm.disable_adapter():
            out_off = pm(ids).logits
    assert rel(out_a, out_b) > 1e-3 and rel(out_a, base_logits) > 1e-3
    assert torch.equal(out_off, base_logits)


def test_merge_and_unload_and_merge_requantized(tiny, tokens):
    torch.manual_seed(2)
    pm = get_peft_model(quantized(tiny, "rtn-4bit", tokens),
                        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                   init_lora_weights=False))
    ids = tokens[:2, :32]
    with torch.no_grad():
        unmerged = pm(ids).logits
        pm.merge_adapter()
        assert rel(pm(ids).logits, unmerged) < 1e-5
        pm.unmerge_adapter()  # the packed base comes back, untouched
        assert torch.equal(pm(ids).logits, unmerged)
        merged = copy.deepcopy(pm).merge_and_unload()
        q = merged.model.layers[0].self_attn.q_proj
        assert type(q) is torch.nn.Linear
        assert rel(merged(ids).logits, unmerged) < 1e-4
        requant = modulora.merge_requantized(copy.deepcopy(pm))
        assert isinstance(requant.model.layers[0].self_attn.q_proj, QuantizedLinear)
        assert not any("lora_" in n for n, _ in requant.named_parameters())
        err_requant = rel(requant(ids).logits, unmerged)
        assert err_requant < 0.2  # 4-bit rounding of W + ΔW, not a lost adapter
        base_err = rel(pm.unload()(ids).logits, unmerged)
        assert err_requant < base_err, (err_requant, base_err)


def test_save_pretrained_round_trip_in_fresh_process(tiny, tokens, tmp_path):
    torch.manual_seed(3)
    model = quantized(tiny, "quip#-2bit", tokens)
    ids = tokens[:2, :32]
    model.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modulora"
    assert config["quantization_config"]["preset"] == "quip#-2bit"
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    pm.save_pretrained(tmp_path / "adapter")
    modulora.save_quantized(pm, tmp_path / "base-from-peft")  # the base under the adapters, same files
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "base-from-peft")
    with torch.no_grad(), pm.disable_adapter():
        assert torch.equal(again(ids).logits, pm(ids).logits)
    with torch.no_grad():
        torch.save({"ids": ids, "base": pm.unload()(ids).logits}, tmp_path / "expected.pt")
    pm = PeftModel.from_pretrained(quantized(tiny, "rtn-4bit", tokens), tmp_path / "adapter")  # any base
    script = textwrap.dedent(f"""
        import torch, modulora
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        exp = torch.load({str(tmp_path / 'expected.pt')!r})
        base = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'base')!r})
        assert sum(isinstance(m, modulora.QuantizedLinear) for m in base.modules()) == {N_LINEARS}
        with torch.no_grad():
            assert torch.equal(base(exp['ids']).logits, exp['base'])
            pm = PeftModel.from_pretrained(base, {str(tmp_path / 'adapter')!r})
            torch.save(pm(exp['ids']).logits, {str(tmp_path / 'adapted.pt')!r})
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
    model2 = quantized(tiny, "quip#-2bit", tokens)  # same calibration, same packed weights
    pm2 = PeftModel.from_pretrained(model2, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "adapted.pt"), pm2(ids).logits)


def test_load_shortcut_separates_quant_and_lora_targets(tiny, tokens):
    base = modulora.load(str(tiny), "rtn-4bit", lora=None)
    assert not any(p.requires_grad for p in base.parameters())
    assert sum(isinstance(m, QuantizedLinear) for m in base.modules()) == N_LINEARS
    pm = modulora.load(str(tiny), "rtn-4bit", lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert isinstance(pm, PeftModel)
    assert sum(isinstance(m, QuantizedLoraLinear) for m in pm.modules()) == 4
    assert sum(isinstance(m, QuantizedLinear) for m in pm.modules()) == N_LINEARS
    skip = modulora.load(str(tiny), "rtn-4bit", lora=None, modules_to_not_convert=["down_proj"])
    assert sum(isinstance(m, QuantizedLinear) for m in skip.modules()) == N_LINEARS - 2
    assert type(skip.model.layers[0].mlp.down_proj) is torch.nn.Linear


def test_bad_inputs(tiny, tokens, tmp_path):
    with pytest.raises(modulora.UnknownQuantizerError, match="rtn-4bit"):
        ModuLoRAConfig("rtn-4bti")
    model = quantized(tiny, "rtn-4bit", tokens)
    with pytest.raises(ValueError, match="Target modules .*not found|not found in the base model"):
        get_peft_model(model, LoraConfig(target_modules=["qq_proj"]))
    model.save_pretrained(tmp_path / "q")
    cfg_path = tmp_path / "q" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization_config"]["quantizer_config"]["family"] = "fancyq"
    cfg["quantization_config"]["plugin"] = "modulora-plugin-fancyq"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(modulora.CheckpointError, match="pip install modulora-plugin-fancyq"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    cfg["quantization_config"]["quantizer_config"]["family"] = "rtn"
    cfg["quantization_config"]["plugin_version"] = "99.0"
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(modulora.CheckpointError, match="another major version"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "q")


def test_trl_sft_trainer_with_peft_config(tiny, tmp_path):
    trl = pytest.importorskip("trl", reason="TRL is not installed (it comes with the 'dev' extra)")
    from datasets import Dataset

    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=ModuLoRAConfig("nf4"))
    texts = [d.doc for d in stdlib_docstrings()[:64]]
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=4, logging_steps=1,
                         report_to=[], use_cpu=True, save_strategy="no", max_length=64, learning_rate=5e-3,
                         disable_tqdm=True, seed=0)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list([{"text": t} for t in texts]),
                             processing_class=AutoTokenizer.from_pretrained(tiny),
                             peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=True,
                                                    task_type="CAUSAL_LM"))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert sum(losses[-3:]) < sum(losses[:3]), losses
    wrapped = [m for m in trainer.model.modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(wrapped) == 4 and all(isinstance(m.get_base_layer(), QuantizedLinear) for m in wrapped)


def test_peft_and_training_never_read_the_dense_weight(tiny, tokens, monkeypatch):
    """PEFT looks up devices and shapes on the base layer: that must not materialize the weight (on a big
    model each read costs a layer's worth of work), and a LoRA step multiplies only through the autograd."""
    reads = []
    original = QuantizedLinear.dequantize
    monkeypatch.setattr(QuantizedLinear, "dequantize", lambda self, dtype=None: reads.append(1) or original(self, dtype))
    model = quantized(tiny, "rtn-4bit", tokens)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    loss = pm(tokens[:2, :32], labels=tokens[:2, :32]).loss
    loss.backward()
    assert reads == []
