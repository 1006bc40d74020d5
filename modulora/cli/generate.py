"""`modulora generate`: answer a prompt with a quantized base and an adapter (chat template when the
tokenizer has one, exactly as in training)."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .common import split_names, targets_option, user_errors

TARGETS_HELP = "with --quantizer: linears to quantize (as in `modulora quantize`)"


def register(app: typer.Typer) -> None:
    @app.command()
    def generate(
        prompt: Annotated[str, typer.Option(help="the prompt ('-': read it from standard input)")],
        model: Annotated[str | None, typer.Option(help="a quantized base or a Hugging Face model "
                                                  "\\[default: SmolLM2-135M-Instruct]")] = None,
        adapter: Annotated[str | None, typer.Option(help="adapter directory (PEFT format)")] = None,
        quantizer: Annotated[str | None, typer.Option(help="quantize a dense --model with this preset first")] = None,
        targets: Annotated[str | None, typer.Option(help=TARGETS_HELP)] = None,
        skip: Annotated[str | None, typer.Option(help="with --quantizer: linears to leave dense")] = None,
        max_new_tokens: Annotated[int, typer.Option(min=1)] = 128,
        temperature: Annotated[float, typer.Option(min=0.0, help="0: greedy")] = 0.0,
        seed: Annotated[int, typer.Option()] = 0,
        chat_template: Annotated[bool | None, typer.Option(help="use the tokenizer's chat template "
                                                           "\\[default: when it has one]")] = None,
    ) -> None:
        """Generate an answer to --prompt."""
        import torch

        from modulora.finetune import models
        from modulora.finetune.evaluate import generate as gen

        text = sys.stdin.read() if prompt == "-" else prompt
        with user_errors():
            path = models.resolve_model(model)
            tok = models.load_tokenizer(path)
            m = models.load_for_inference(path, adapter, quantizer, targets=targets_option(targets),
                                          skip=split_names(skip))
            torch.manual_seed(seed)
            out = gen(m, tok, [text], max_new_tokens=max_new_tokens, batch_size=1, chat=chat_template,
                      do_sample=temperature > 0, temperature=temperature or 1.0)
        typer.echo(out[0])
