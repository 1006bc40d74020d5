"""Examples -> token ids: prompt rendering (the tokenizer's chat template when it has one), loss masking
of prompt tokens, truncation to the context length, and the padding collator.

The same rendering is used to train, to evaluate and by ``modulora generate``, so a finetuned adapter sees
at inference exactly the prompt layout it was trained on.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .data import Example

IGNORE_INDEX = -100  # label value the HF loss skips
TAIL_KEEP = 16  # when a prompt is cut, its last tokens (the chat template's assistant header) stay


def uses_chat_template(tokenizer: Any, chat: bool | None = None) -> bool:
    """``chat`` if given, else whether the tokenizer has a chat template."""
    return bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat


def render_prompt(tokenizer: Any, prompt: str, chat: bool | None = None) -> str:
    """The text the model sees before its answer: a one-turn chat with a generation prompt, or
    ``prompt + "\\n"`` for tokenizers without a chat template."""
    if uses_chat_template(tokenizer, chat):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt + "\n"


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos(tokenizer: Any) -> list[int]:
    """``[bos]`` when the tokenizer prepends one to plain text (Llama), else ``[]`` (SmolLM2, ByT5)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set tokenizer.eos_token to train completions")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer))


@dataclass
class EncodedExample:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(tokenizer: Any, ex: Example, max_length: int, chat: bool | None = None) -> EncodedExample:
    """Token ids and labels; labels are ``IGNORE_INDEX`` over the prompt. Longer than ``max_length``: the
    prompt is cut in its middle (its head and its last ``TAIL_KEEP`` tokens stay), then the completion."""
    if ex.prompt is None:  # plain text: learn every token
        ids = _bos(tokenizer) + _ids(tokenizer, ex.completion) + [eos_id(tokenizer)]
        cut = len(ids) > max_length
        ids = ids[:max_length]
        return EncodedExample(ids, list(ids), cut)
    chat_on = uses_chat_template(tokenizer, chat)
    p = ([] if chat_on else _bos(tokenizer)) + _ids(tokenizer, render_prompt(tokenizer, ex.prompt, chat_on))
    c = _ids(tokenizer, ex.completion) + [eos_id(tokenizer)]
    cut = len(p) + len(c) > max_length
    if cut:
        c = c[: max(1, max_length - min(len(p), max_length // 2))]
        room = max_length - len(c)
        tail = min(TAIL_KEEP, room // 2)
        p = p[: room - tail] + (p[-tail:] if tail else [])
    return EncodedExample(p + c, [IGNORE_INDEX] * len(p) + c, cut)


class EncodedDataset(torch.utils.data.Dataset):
    """A list of encoded examples (what the Trainer iterates); warns once about truncated ones."""

    def __init__(self, tokenizer: Any, examples: list[Example], max_length: int, chat: bool | None = None,
                 what: str = "examples") -> None:
        self.items = [encode_example(tokenizer, ex, max_length, chat) for ex in examples]
        n_cut = sum(e.truncated for e in self.items)
        if n_cut:
            warnings.warn(f"{n_cut} of {len(self.items)} {what} are longer than {max_length} tokens and were "
                          f"truncated; raise --max-length to keep them whole", stacklevel=2)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.items[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


@dataclass
class PadCollator:
    """Right-pads a batch to its longest example: ``input_ids``/``attention_mask``/``labels`` ``(B, T)``."""

    pad_token_id: int

    def __call__(self, batch: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        n = max(len(b["input_ids"]) for b in batch)
        ids = torch.full((len(batch), n), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), n), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), n), dtype=torch.long)
        for i, b in enumerate(batch):
            k = len(b["input_ids"])
            ids[i, :k] = torch.tensor(b["input_ids"])
            labels[i, :k] = torch.tensor(b["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def context_length(model: Any) -> int | None:
    """The model's maximum context (``max_position_embeddings``), if its config says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)
