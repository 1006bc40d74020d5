"""Adapters and training that would go silently wrong (issue 13, items 3, 5, 9): an adapter trained on another
model with the same shapes, a PEFT adapter whose shapes do not fit, NaN adapters, and a NaN/inf loss, which
stops training at once, names the damaged weights or the first layer that overflowed, and saves nothing."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

import modulora
from modulora.finetune.data import Example
from modulora.finetune.encoding import EncodedDataset, PadCollator
from modulora.finetune.models import lora_config
from modulora.finetune.tiny import tiny_llama_dir
from modulora.finetune.train import (
    ModuLoRATrainer,
    NonFiniteError,
    TrainConfig,
    last_checkpoint,
    training_arguments,
)

pytestmark = pytest.mark.usefixtures("one_thread")
TARGETS = ["q_proj", "v_proj"]


def tiny_llama(seed: int = 0, hidden: int = 64) -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def adapter_of(model: LlamaForCausalLM, d: Path, quantizer: str = "rtn-4bit") -> Path:
    peft_model = modulora.load(model, quantizer, lora=LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for p in modulora.lora_parameters(peft_model):
            p.normal_(std=0.05)
    modulora.save_adapter(peft_model, d)
    return d


def test_adapter_of_another_model_with_the_same_shapes_is_refused(tmp_path):
    d = adapter_of(tiny_llama(seed=0), tmp_path / "a")
    with pytest.raises(modulora.AdapterError, match="shapes match but the weights differ"):
        modulora.load_adapter(modulora.load(tiny_llama(seed=1), "rtn-4bit", lora=None), d)
    modulora.load_adapter(modulora.load(tiny_llama(seed=0), "rtn-4bit", lora=None), d)  # its own base: fine
    # another quantizer of the same model is allowed on request (the unquantized weights are the same) ...
    modulora.load_adapter(modulora.load(tiny_llama(seed=0), "rtn-2bit", lora=None), d, allow_other_quantizer=True)
    # ... another model is not
    with pytest.raises(modulora.AdapterError, match="weights differ"):
        modulora.load_adapter(modulora.load(tiny_llama(seed=1), "rtn-2bit", lora=None), d,
                              allow_other_quantizer=True)


def test_peft_adapter_that_does_not_fit_is_a_clear_error(tmp_path):
    small = get_peft_model(tiny_llama(hidden=32), LoraConfig(r=4, target_modules=TARGETS))
    small.save_pretrained(tmp_path / "plain")  # stock PEFT: no modulora_config.json, shapes checked by PEFT
    with pytest.raises(modulora.AdapterError, match=r"does not fit this model \(size mismatch"):
        modulora.load_adapter(modulora.load(tiny_llama(), "rtn-4bit", lora=None), tmp_path / "plain")


def test_nan_adapter_is_never_saved(tmp_path):
    peft_model = modulora.load(tiny_llama(), "rtn-4bit", lora=LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        modulora.lora_parameters(peft_model)[0][0, 0] = float("nan")
    with pytest.raises(modulora.AdapterError, match="NaN/inf values.*not saved"):
        modulora.save_adapter(peft_model, tmp_path / "a")
    assert not (tmp_path / "a" / "adapter_model.safetensors").exists()


def trainer(tmp_path: Path, damage) -> ModuLoRATrainer:
    tiny = tiny_llama_dir(tmp_path / "tiny")
    base = modulora.load(str(tiny), "rtn-4bit", lora=None)
    torch.manual_seed(0)
    model = get_peft_model(base, lora_config(base, r=4))
    damage(model)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = TrainConfig(max_steps=3, batch_size=4, save_steps=1, logging_steps=1, warmup_ratio=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = training_arguments(cfg, tmp_path / "checkpoints", progress=False)
    examples = [Example(f"Repeat {w}", f"{w} {w}") for w in "alpha beta gamma delta epsilon zeta".split()]
    return ModuLoRATrainer(model=model, args=args, train_dataset=EncodedDataset(tok, examples, 64),
                           data_collator=PadCollator(tok.pad_token_id))


def _nan_norm(model) -> None:
    with torch.no_grad():
        model.base_model.model.model.norm.weight[3] = float("nan")


def _overflowing_lora(model) -> None:
    layer = model.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e38)
        layer.lora_A["default"].weight.fill_(1e38)


@pytest.mark.parametrize(("damage", "named"), [
    (_nan_norm, r"these weights hold NaN/inf: base_model\.model\.model\.norm\.weight"),
    (_overflowing_lora, r"first layer whose output is NaN/inf: base_model\.model\.model\.layers\.1\.self_attn"
                        r"\.v_proj.*lower --lr"),
], ids=["nan-norm", "overflow"])
def test_a_non_finite_loss_stops_training_naming_the_cause(tmp_path, damage, named):
    tr = trainer(tmp_path, damage)
    with pytest.raises(NonFiniteError, match=rf"training stopped at step 1: .*{named}"):
        tr.train()
    assert last_checkpoint(tmp_path / "checkpoints") is None  # nothing saved, NaN or not
