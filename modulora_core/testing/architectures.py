"""Tiny random models of 19 transformers causal-LM architectures, for tests and coverage reports.

Dense blocks (llama ... bloom), GPT-2's ``Conv1D`` and mixture-of-experts models with fused 3-D experts
(mixtral, qwen3_moe, gpt_oss, deepseek_v3). A plugin author can run a preset over all of them
(``tests/test_architectures.py`` shows how) to see that it packs every architecture's shapes.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB = 96
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, tie_word_embeddings=False)
MOE: dict[str, Any] = dict(num_local_experts=4, num_experts=4, n_routed_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=48)
# per architecture: config overrides; None removes a COMMON key the config does not take
ARCHS: dict[str, dict[str, Any]] = {
    "llama": {}, "mistral": {}, "qwen2": {}, "qwen3": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {},
    "phi": {}, "phi3": {}, "starcoder2": {}, "gpt_neox": {},
    "opt": dict(ffn_dim=96, word_embed_proj_dim=64),
    "falcon": dict(head_dim=None, num_key_value_heads=None, new_decoder_architecture=True, num_kv_heads=2),
    "bloom": dict(n_layer=2, n_head=4),
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96),
    "mixtral": MOE, "qwen3_moe": MOE, "gpt_oss": MOE,
    "deepseek_v3": dict(MOE, head_dim=None, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                        qk_nope_head_dim=8, v_head_dim=16, first_k_dense_replace=1, n_group=1, topk_group=1,
                        n_shared_experts=1),
}
MOE_ARCHS = frozenset({"mixtral", "qwen3_moe", "gpt_oss", "deepseek_v3"})


def tiny_model(arch: str, seed: int = 0) -> nn.Module:
    """A random float32 causal LM of ``arch`` (a key of :data:`ARCHS`), 2 blocks of width 64, eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if arch not in ARCHS:
        raise KeyError(f"no tiny config for {arch!r}; known: {sorted(ARCHS)}")
    kw = {k: v for k, v in {**COMMON, **ARCHS[arch]}.items() if v is not None}
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **kw))
    return model.float().eval()
