"""Any Hugging Face causal LM: tiny random models of 19 transformers architectures, dense, Conv1D (GPT-2)
and mixture-of-experts (fused 3-D experts), each quantized, finetuned, generated from, saved and reloaded."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM

import modulora
from modulora import QuantizedLinear
from modulora_core.coverage import coverage
from modulora_core.experts import is_unfused_experts
from modulora_core.peft_lora import QuantizedLoraLinear
from modulora_core.testing.architectures import ARCHS, MOE_ARCHS, VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")



def tiny(arch: str, seed: int = 0) -> nn.Module:
    return tiny_model(arch, seed)


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))


def train(model: nn.Module, ids: torch.Tensor, steps: int = 5) -> list[float]:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_architecture_quantize_train_generate_save_reload(arch, ids, tmp_path):
    model = tiny(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # a dense-weights warning would fail the test
        pm = modulora.load(model, "rtn-4bit")
    base = pm.get_base_model()
    cov = coverage(base)
    assert cov.dense == {}, f"{arch}: decoder matrices left dense: {sorted(cov.dense)}"
    assert cov.fraction_of_quantizable == 1.0
    assert all("gate" in n.rsplit(".", 2)[-2] or "router" in n for n in cov.by_design), cov.by_design
    if arch in MOE_ARCHS:
        assert any(is_unfused_experts(m) for m in base.modules())
        experts = [n for n, m in base.named_modules() if isinstance(m, QuantizedLinear) and ".experts." in n]
        assert len(experts) >= 2 * 4, f"{arch}: expected each expert's two matrices packed, got {experts[:4]}"
        assert any(isinstance(m, QuantizedLoraLinear) and ".experts." in n for n, m in pm.named_modules())

    losses = train(pm, ids)
    assert losses[-1] < losses[0], f"{arch}: loss did not fall: {losses}"
    out = pm.generate(input_ids=ids[:1, :5], attention_mask=torch.ones_like(ids[:1, :5]), max_new_tokens=4,
                      do_sample=False)
    assert out.shape == (1, 9)

    modulora.save_quantized(pm, tmp_path / "base")
    pm.save_pretrained(tmp_path / "adapter")
    again = PeftModel.from_pretrained(modulora.load(tmp_path / "base", lora=None), tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "mixtral", "gpt_oss"])
def test_dense_export_restores_the_stock_layout(arch, ids, tmp_path):
    """Merged and dequantized, a GPT-2 gets its Conv1D back (c_proj is square: a missed transpose would load
    silently wrong) and a MoE model its fused 3-D experts; stock transformers reloads the same function."""
    pm = modulora.load(tiny(arch), "rtn-4bit")
    train(pm, ids, steps=2)
    dense = modulora.dequantize(pm, merge=True)
    dense.save_pretrained(tmp_path / "dense")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert not any(isinstance(m, QuantizedLinear) or is_unfused_experts(m) for m in stock.modules())
    with torch.no_grad():
        torch.testing.assert_close(stock(input_ids=ids).logits, pm(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_conv1d_quantizes_the_transposed_weight(ids):
    """8 bits: the quantized GPT-2 must compute what the dense one does (a wrong transpose would not)."""
    dense = tiny("gpt2")
    with torch.no_grad():
        ref = dense(input_ids=ids).logits
    q = modulora.load(tiny("gpt2"), "rtn-8bit", lora=None)
    layer = q.transformer.h[0].attn.c_attn
    assert isinstance(layer, QuantizedLinear) and layer.source_layout == "conv1d"
    assert (layer.out_features, layer.in_features) == (3 * 64, 64)
    with torch.no_grad():
        got = q(input_ids=ids).logits
    assert float((got - ref).norm() / ref.norm()) < 0.02


def test_moe_experts_are_dense_one_at_a_time(ids, monkeypatch):
    """Forward keeps no materialized expert alive for backward, and backward materializes one at a time."""
    pm = modulora.load(tiny("mixtral"), "rtn-4bit")
    layer = next(m for n, m in pm.named_modules() if isinstance(m, QuantizedLinear) and ".experts." in n)
    cls = type(layer.quantizer)
    alive: set[int] = set()
    peak = [0]
    original = cls.materialize

    def tracked(self, *a, **k):
        w = original(self, *a, **k)
        key = id(w)
        alive.add(key)
        peak[0] = max(peak[0], len(alive))
        import weakref
        weakref.finalize(w, alive.discard, key)
        return w

    monkeypatch.setattr(cls, "materialize", tracked)
    pm.train()
    loss = pm(input_ids=ids, labels=ids).loss
    assert not alive, f"{len(alive)} materialized weights outlive the forward"
    assert peak[0] == 1
    peak[0] = 0
    loss.backward()
    assert not alive and peak[0] == 1


def test_calibrated_moe_gets_per_expert_hessians_and_reports_unrouted_experts(ids):
    """optq on Mixtral: each expert is calibrated on its routed tokens; a router that sends every token to
    experts 0 and 1 leaves 2 and 3 without tokens, and the run says so instead of failing or guessing silently."""
    model = tiny("mixtral")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.gate.weight.zero_()  # equal logits: top-2 picks experts 0 and 1
    with pytest.warns(UserWarning, match=r"routed no token to 8 of 16 expert matrices"):
        q = modulora.load(model, "optq-4bit", lora=None, calibration=[ids[i] for i in range(4)])
    assert sum(isinstance(m, QuantizedLinear) for n, m in q.named_modules() if ".experts." in n) == 16


def test_target_parameters_on_experts_become_per_expert_lora(ids):
    """PEFT's way to reach fused experts (``target_parameters``) lands on the unfused per-expert modules."""
    base = modulora.load(tiny("qwen3_moe"), "rtn-4bit", lora=None)
    pm = get_peft_model(base, LoraConfig(r=4, target_modules=[], target_parameters=["mlp.experts.down_proj"]))
    adapted = [n for n, m in pm.named_modules() if isinstance(m, QuantizedLoraLinear)]
    assert len(adapted) == 2 * 4 and all(n.endswith("down_proj") and ".experts." in n for n in adapted)
    losses = train(pm, ids, steps=4)
    assert losses[-1] < losses[0]


class Scaled(nn.Module):
    """A layer type no quantizer knows: ``x W^T * s``."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())
        self.s = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight) * self.s


def test_unknown_layer_type_is_named_with_its_share():
    model = tiny("llama")
    model.model.layers[0].mlp.down_proj = Scaled(model.model.layers[0].mlp.down_proj)
    with pytest.warns(UserWarning, match=r"1 decoder-block matrices stay dense \(\d+\.\d% .*\['Scaled'\].*"
                                         r"layers\.0\.mlp\.down_proj\.weight"):
        q = modulora.load(model, "rtn-4bit", lora=None)
    cov = coverage(q)
    assert list(cov.dense) == ["model.layers.0.mlp.down_proj.weight"] and 0 < cov.fraction < 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        modulora.load(tiny("llama"), "rtn-4bit", lora=None, modules_to_not_convert=["o_proj"])


def test_linears_left_out_of_the_targets_are_not_reported_as_unpackable():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        q = modulora.load(tiny("llama"), "rtn-4bit", lora=None, targets=["q_proj", "v_proj"])
    cov = coverage(q)
    assert cov.dense == {} and "model.layers.0.mlp.down_proj.weight" in cov.by_design
    assert 0 < cov.fraction < 1
