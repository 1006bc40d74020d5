"""Scoring a (quantized, adapted) causal LM: validation loss and perplexity, greedy generation, and task
metrics (ROUGE, accuracy) on generated answers."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch

from .data import Example
from .encoding import EncodedDataset, PadCollator, _bos, _ids, pad_id, render_prompt, uses_chat_template
from .tasks import Task


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """``model.eval()`` and ``torch.no_grad()`` inside, the previous training mode restored after."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was)


def _progress(total: int, desc: str, show: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="ex", disable=not show, leave=False)


def loss_and_perplexity(model: torch.nn.Module, dataset: EncodedDataset, pad_token_id: int,
                        batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Mean loss per predicted token over ``dataset`` (labels masked as in training) and its exp."""
    collate = PadCollator(pad_token_id)
    total, count = 0.0, 0
    device = next(model.parameters()).device
    with eval_mode(model), _progress(len(dataset), "loss", progress) as bar:
        for i in range(0, len(dataset), batch_size):
            batch = collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
            batch = {k: v.to(device) for k, v in batch.items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            # (B, T-1, V) against the next tokens; masked positions contribute nothing
            labels = batch["labels"][:, 1:]
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((labels != -100).sum())
            bar.update(batch["input_ids"].shape[0])
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0))}


def generate(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int = 64,
             batch_size: int = 8, chat: bool | None = None, progress: bool = False,
             do_sample: bool = False, temperature: float = 1.0) -> list[str]:
    """The model's answer to each prompt (rendered as in training), greedy by default, left-padded batches."""
    chat_on = uses_chat_template(tokenizer, chat)
    device = next(model.parameters()).device
    pid = pad_id(tokenizer)
    eos = [tokenizer.eos_token_id]
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos += gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else []
    eos = sorted({e for e in eos if e is not None})
    outputs: list[str] = []
    with eval_mode(model), _progress(len(prompts), "generate", progress) as bar:
        for i in range(0, len(prompts), batch_size):
            seqs = [([] if chat_on else _bos(tokenizer)) + _ids(tokenizer, render_prompt(tokenizer, p, chat_on))
                    for p in prompts[i:i + batch_size]]
            n = max(len(s) for s in seqs)
            ids = torch.tensor([[pid] * (n - len(s)) + s for s in seqs], device=device)  # (B, T) left-padded
            mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], device=device)
            kw: dict[str, Any] = {"do_sample": do_sample}
            if do_sample:
                kw["temperature"] = temperature
            else:  # greedy: silence the sampling defaults a model's generation_config may carry
                kw.update(temperature=None, top_p=None, top_k=None)
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 pad_token_id=pid, eos_token_id=eos, **kw)
            outputs += [tokenizer.decode(o[n:], skip_special_tokens=True).strip() for o in out]
            bar.update(len(seqs))
    return outputs


def merged_copy(model: Any) -> Any:
    """For fast generation: a dense model with the same weights (each packed base materialized once, the
    active adapters merged in, or left out while they are disabled), or ``model`` itself when it has no
    quantized layers. Costs the dense model's memory; a decode step then multiplies instead of
    re-materializing every layer for every token."""
    import modulora

    if next(modulora.iter_quantized_layers(model), None) is None:
        return model
    return modulora.dequantize(model, merge=not adapters_disabled(model)).eval()


def adapters_disabled(model: Any) -> bool:
    """True inside ``PeftModel.disable_adapter()`` (the model then computes as its base)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(m.disable_adapters for m in model.modules() if isinstance(m, BaseTunerLayer))


def evaluate_examples(model: Any, tokenizer: Any, task: Task, examples: list[Example], *, max_length: int,
                      batch_size: int = 8, chat: bool | None = None, generate_answers: bool = True,
                      progress: bool = False, merged: bool = False) -> dict[str, Any]:
    """Loss/perplexity on ``examples`` and, for tasks with a metric, the generated answers' scores.

    ``merged``: generate with :func:`merged_copy` (same weights, much faster on CPU; the loss is always
    computed by ``model`` itself). Returns ``{"loss", "perplexity", <metric keys>...,
    "samples": [{prompt, reference, prediction}]}``.
    """
    ds = EncodedDataset(tokenizer, examples, max_length, chat, what=f"{task.name} evaluation examples")
    metrics: dict[str, Any] = loss_and_perplexity(model, ds, pad_id(tokenizer), batch_size, progress)
    if task.metric and generate_answers:
        gen_model = merged_copy(model) if merged else model
        preds = generate(gen_model, tokenizer, [e.prompt or "" for e in examples], batch_size=batch_size,
                         max_new_tokens=task.max_new_tokens, chat=chat, progress=progress)
        del gen_model
        refs = [e.completion for e in examples]
        metrics.update(task.score(preds, refs))
        metrics["samples"] = [{"prompt": e.prompt, "reference": r, "prediction": p}
                              for e, r, p in zip(examples[:3], refs[:3], preds[:3], strict=False)]
    return metrics
