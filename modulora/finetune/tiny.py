"""A tiny random Llama with a byte-level tokenizer and a chat template: nothing to download, seconds to
train. For smoke tests of the whole pipeline (``python -m modulora.finetune.tiny DIR`` writes one), never for
numbers that mean anything."""

from __future__ import annotations

import sys
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def tiny_llama_dir(directory: str | Path, *, layers: int = 2, hidden: int = 64, seed: int = 0) -> Path:
    """Save a random ``LlamaForCausalLM`` (hidden ``hidden``, ``layers`` blocks) and ByT5's byte tokenizer
    (with :data:`CHAT_TEMPLATE`) as a Hugging Face model directory; returns it."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).float()
    d = Path(directory)
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


if __name__ == "__main__":
    print(tiny_llama_dir(sys.argv[1] if len(sys.argv) > 1 else "tiny-llama"))
