"""The mixture-of-experts rows of ``bench_memory --moe``: a random Mixtral-shaped model, ModuLoRA at 2 and 4
bits against plain PEFT LoRA on the dense model, one LoraConfig for all (attention plus every expert
through ``target_parameters``).

ModuLoRA: the dense random model is built, then ``modulora.load(model, preset, lora=None)`` unfuses the
experts (one linear per expert matrix) and packs each, then PEFT's LoRA goes on (``target_parameters`` on
the experts become per-expert adapters). Dense: stock transformers, fused experts, PEFT's LoRA on the
fused parameters. The measurement itself is bench_memory's (a subprocess per configuration, peak RSS of one
step after a warm-up step).
"""

from __future__ import annotations

from typing import Any

import torch

# MixtralConfig kwargs: 0.23B parameters, of which the experts are 74 %
MOE_MODELS: dict[str, dict[str, Any]] = {
    "mixtral-0.2b": {"hidden_size": 768, "intermediate_size": 1536, "num_hidden_layers": 6,
                     "num_attention_heads": 12, "num_key_value_heads": 4, "num_local_experts": 8,
                     "num_experts_per_tok": 2, "vocab_size": 32000, "tie_word_embeddings": False},
}
# (model, quantizer, batch, seq, gradient checkpointing, chunk_rows), as bench_memory's rows
MOE = [("mixtral-0.2b", q, 2, 256, False, None) for q in ("rtn-2bit", "rtn-4bit", "dense")]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(name: str) -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(**MOE_MODELS[name], architectures=["MixtralForCausalLM"])


def moe_lora_config(r: int) -> Any:
    """The one LoraConfig of every MoE row: r, alpha 2r, attention and every expert, no dropout."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTENTION, target_parameters=EXPERTS,
                      lora_dropout=0.0)


def build_moe(name: str, quantizer: str, r: int, fill: Any) -> Any:
    """The random model with PEFT LoRA; ``fill(model, config, generator)`` gives meta parameters values."""
    from peft import get_peft_model

    import modulora
    from modulora_core.surgery import build_empty

    config = moe_config(name)
    model = build_empty(config)
    fill(model, config, torch.Generator().manual_seed(0))
    if quantizer != "dense":
        model = modulora.load(model, quantizer, lora=None)
    return get_peft_model(model, moe_lora_config(r))


INTRO = (
    "A random Mixtral-shaped model (hidden 768, 6 layers, 8 experts of width 1536, top-2, 12 heads, 4 KV "
    "heads, vocabulary 32000; 0.23B parameters, 74 % of them in the experts). LoRA r=8 on q/k/v/o and on "
    "every expert through PEFT's `target_parameters=[\"mlp.experts.gate_up_proj\", \"mlp.experts.down_proj\"]`, "
    "the same LoraConfig for every row. ModuLoRA rows: `modulora.load(model, preset, lora=None)` unfuses "
    "the experts into one linear per expert matrix and packs each (routers stay dense), then PEFT's LoRA, "
    "per expert. dense = stock transformers (fused experts, its `grouped_mm` experts) and PEFT's LoRA on the "
    "fused parameters, which adds A@B to each whole expert stack every forward and keeps that dense copy for "
    "backward. One training step (float32, AdamW) after a warm-up step, each configuration in its own "
    "process; measured and predicted as in the validation table above. The machine is 2 shared cores (step "
    "times vary with its load; peak memory does not).\n\n")


def summary(rows: list[dict]) -> str:
    """The worst prediction error and each ModuLoRA row's peak against dense LoRA's."""
    worst = max(rows, key=lambda r: abs(r["error_pct"]))
    dense = next((r for r in rows if r["quantizer"] == "dense"), None)
    text = f"\nWorst prediction error: {worst['error_pct']:+.1f}% ({worst['quantizer']}); the target is 10%.\n"
    if dense:
        ratios = [f"{r['quantizer']} {r['measured'] / dense['measured']:.2f}x ({r['measured'] / 2**30:.2f} GiB)"
                  for r in rows if r["quantizer"] != "dense"]
        text += (f"\nMeasured peak against PEFT dense LoRA ({dense['measured'] / 2**30:.2f} GiB): "
                 + ", ".join(ratios) + ".\n")
    return text
