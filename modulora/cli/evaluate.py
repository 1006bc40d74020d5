"""`modulora eval`: score a model (a quantized base, with or without an adapter, or a dense model) on a
built-in task, on your data, or by perplexity on a text file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import fail, split_names, targets_option, user_errors
from .generate import TARGETS_HELP


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: Annotated[str | None, typer.Option(help="a quantized base (modulora quantize / finetune's "
                                                  "base/), or a Hugging Face model \\[default: SmolLM2]")] = None,
        adapter: Annotated[str | None, typer.Option(help="adapter directory (PEFT format)")] = None,
        quantizer: Annotated[str | None, typer.Option(help="quantize a dense --model with this preset first")] = None,
        targets: Annotated[str | None, typer.Option(help=TARGETS_HELP)] = None,
        skip: Annotated[str | None, typer.Option(help="with --quantizer: linears to leave dense")] = None,
        task: Annotated[str | None, typer.Option(help="built-in task: docsum or docmodule")] = None,
        data: Annotated[Path | None, typer.Option(help="your data file: validation loss")] = None,
        perplexity: Annotated[Path | None, typer.Option(help="a text file: perplexity over it")] = None,
        split: Annotated[str, typer.Option(help="which split of the task/data")] = "validation",
        limit: Annotated[int, typer.Option(min=1, help="examples to score")] = 64,
        max_length: Annotated[int, typer.Option(min=8, help="tokens per example / perplexity window")] = 256,
        batch_size: Annotated[int, typer.Option(min=1)] = 8,
        chat_template: Annotated[bool | None, typer.Option(help="render prompts with the chat template "
                                                           "\\[default: when the tokenizer has one]")] = None,
        merged: Annotated[bool, typer.Option(help="generate answers with a merged dense copy (same weights, "
                                             "faster; off for models too big to hold dense)")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="print the metrics as JSON")] = False,
    ) -> None:
        """Evaluate: --task T (its metric + loss), --data F (loss), or --perplexity F (perplexity)."""
        if sum(x is not None for x in (task, data, perplexity)) != 1:
            raise fail("give exactly one of --task, --data or --perplexity")
        from modulora.finetune import models
        from modulora.finetune.evaluate import evaluate_examples
        from modulora.finetune.tasks import data_task, get_task

        with user_errors():
            path = models.resolve_model(model)
            tok = models.load_tokenizer(path)
            text = _read_text(perplexity) if perplexity is not None else None  # bad input fails before loading
            t = None if text is not None else get_task(task) if task else data_task(data)  # type: ignore[arg-type]
            m = models.load_for_inference(path, adapter, quantizer, targets=targets_option(targets),
                                          skip=split_names(skip))
            if t is None:
                metrics = perplexity_of(m, tok, text, max_length, batch_size)
            else:
                examples = t.examples(split)[:limit]
                metrics = evaluate_examples(m, tok, t, examples, max_length=max_length, batch_size=batch_size,
                                            chat=chat_template, progress=True, merged=merged)
                metrics["examples"] = len(examples)
        _report(metrics, as_json)


def _read_text(p: Path) -> str:
    from modulora_core.errors import DataError

    if not p.is_file():
        raise DataError(f"{p} does not exist; --perplexity takes a text file")
    text = p.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{p} is empty")
    return text


def perplexity_of(model: Any, tok: Any, text: str, window: int, batch_size: int) -> dict[str, float]:
    """Perplexity over ``text`` cut into non-overlapping windows of ``window`` tokens."""
    import torch

    from modulora.finetune.evaluate import eval_mode

    ids = tok(text, add_special_tokens=False)["input_ids"]
    blocks = [ids[i:i + window] for i in range(0, len(ids), window)]
    blocks = [b for b in blocks if len(b) > 1]
    total, count = 0.0, 0
    with eval_mode(model):
        for i in range(0, len(blocks), batch_size):
            for b in blocks[i:i + batch_size]:  # one at a time: windows differ in length only at the end
                x = torch.tensor([b])
                loss = model(input_ids=x, labels=x).loss
                total += float(loss) * (len(b) - 1)
                count += len(b) - 1
    mean = total / max(1, count)
    return {"loss": mean, "perplexity": math.exp(min(mean, 50.0)), "tokens": count}


def _report(metrics: dict[str, Any], as_json: bool) -> None:
    samples = metrics.pop("samples", [])
    if as_json:
        typer.echo(json.dumps({**metrics, "samples": samples}, indent=2))
        return
    for k, v in metrics.items():
        typer.echo(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    for s in samples[:1]:
        typer.echo(f"example: reference {s['reference']!r}\n         prediction {s['prediction']!r}")
