"""`modulora quantize MODEL --quantizer Q --out DIR`: quantize once and save the packed base.

The directory it writes loads with ``modulora.load(DIR)`` and is accepted by ``--model`` of the other
commands, so finetuning and evaluation never quantize again.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import (
    calibration_for,
    default_quantizer,
    load_dense,
    load_tokenizer,
    resolve_model,
    say,
    user_errors,
    writable_dir,
)


def register(app: typer.Typer) -> None:
    @app.command()
    def quantize(
        model: Annotated[str | None, typer.Argument(help="Hugging Face model directory or id "
                                                    "[default: SmolLM2-135M-Instruct]")] = None,
        quantizer: Annotated[str | None, typer.Option(help="quantizer preset [default: as `finetune`]")] = None,
        out: Annotated[Path, typer.Option(help="directory for the quantized base")] = Path("modulora-base"),
        calibration: Annotated[str, typer.Option(help="calibration text for quantizers that need it: a "
                                                 "built-in task name or a data file")] = "docsum",
        calibration_samples: Annotated[int, typer.Option(min=1, help="calibration examples")] = 32,
        seq_len: Annotated[int, typer.Option(min=8, help="tokens per calibration example")] = 256,
        rank: Annotated[int, typer.Option(min=1, help="LoRA rank recorded with the base (default for "
                                          "finetuning it)")] = 8,
        alpha: Annotated[float, typer.Option(help="LoRA alpha recorded with the base")] = 16.0,
        chunk_rows: Annotated[int | None, typer.Option(min=1, help="materialize W in tiles of N rows")] = None,
    ) -> None:
        """Quantize a model's decoder linears with a quantizer plugin and save the packed base."""
        import time

        import modulora

        with user_errors():
            t0 = time.perf_counter()
            out = writable_dir(out)
            path = resolve_model(model)
            if not quantizer:
                quantizer, note = default_quantizer()
                if note:
                    say(f"[yellow]{note}[/]")
            tok = load_tokenizer(path)
            dense = load_dense(path)
            bq = modulora.get_quantizer(quantizer)
            cal = None
            if bq.capabilities().needs_calibration:
                cal = calibration_for(_texts(calibration), tok, calibration_samples, seq_len)
                say(f"calibrating on {calibration_samples} x {seq_len} tokens of {calibration}")
            m = modulora.load(dense, quantizer, calibration=cal, chunk_rows=chunk_rows,
                              lora=modulora.LoraConfig(r=rank, alpha=alpha))
            modulora.save_quantized(m, out, tokenizer=tok)
            n = sum(1 for _ in modulora.iter_modulora_layers(m))
            typer.echo(f"quantized {n} linear layers of {path} with {quantizer} in "
                       f"{time.perf_counter() - t0:.0f} s; saved to {out}\n"
                       f"finetune it: modulora finetune --model {out}")


def _texts(source: str) -> list[str]:
    from modulora.finetune.tasks import TASKS, data_task, get_task

    task = get_task(source) if source in TASKS else data_task(source)
    return [f"{e.prompt}\n{e.completion}" if e.prompt else e.completion for e in task.examples("train")]
