"""`modulora quantize MODEL --quantizer Q --out DIR`: quantize once and save the packed base.

The directory it writes is a Hugging Face checkpoint (``from_pretrained(DIR)`` after ``import modulora``,
or ``modulora.load(DIR)``) and is accepted by ``--model`` of the other commands, so finetuning and
evaluation never quantize again. Adapters are not part of it: ``modulora finetune`` adds them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from modulora.finetune.train_config import FinetuneConfig

from .common import help_text, say, split_names, targets_option, user_errors, writable_dir

_J = FinetuneConfig.model_fields


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: Annotated[str | None, typer.Argument(help="Hugging Face model directory or id "
                                                    "\\[default: SmolLM2-135M-Instruct]")] = None,
        quantizer: Annotated[str | None, typer.Option(help="quantizer preset \\[default: as `finetune`]")] = None,
        out: Annotated[Path, typer.Option(help="directory for the quantized base")] = Path("modulora-base"),
        targets: Annotated[str | None, typer.Option(help=help_text(_J["targets"].description or ""))] = None,
        skip: Annotated[str | None, typer.Option(help=help_text(_J["skip"].description or ""))] = None,
        calibration: Annotated[str, typer.Option(help="calibration text for quantizers that need it: a "
                                                 "built-in task name or a data file")] = "docsum",
        calibration_samples: Annotated[int, typer.Option(min=1, help="calibration examples")] = 32,
        seq_len: Annotated[int, typer.Option(min=8, help="tokens per calibration example")] = 256,
        chunk_rows: Annotated[int | None, typer.Option(min=1, help=_J["chunk_rows"].description)] = None,
    ) -> None:
        """Quantize a model's linears (the decoder blocks', or --targets) and save the packed base."""
        import time

        import modulora
        from modulora.finetune import models

        with user_errors():
            t0 = time.perf_counter()
            out = writable_dir(out)
            path = models.resolve_model(model, what="MODEL")
            if not quantizer:
                quantizer, note = models.default_quantizer()
                if note:
                    say(f"[yellow]{note}[/]")
            tok = models.load_tokenizer(path)
            base = models.quantize(models.load_dense(path), quantizer, targets=targets_option(targets),
                                   skip=split_names(skip), chunk_rows=chunk_rows,
                                   calibration_texts=calibration_texts(calibration), tokenizer=tok,
                                   calibration_samples=calibration_samples, seq_len=seq_len)
            modulora.save_quantized(base, out, tokenizer=tok)
            n = sum(1 for _ in modulora.iter_quantized_layers(base))
        typer.echo(f"quantized {n} linear layers of {path} with {quantizer} in {time.perf_counter() - t0:.0f} s; "
                   f"saved to {out}\nfinetune it: modulora finetune --model {out}")


def calibration_texts(source: str) -> list[str]:
    """The training text of a built-in task (by name) or of a data file."""
    from modulora.finetune.models import task_texts
    from modulora.finetune.tasks import TASKS, data_task, get_task

    return task_texts(get_task(source) if source in TASKS else data_task(source))
