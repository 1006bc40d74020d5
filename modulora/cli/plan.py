"""`modulora plan`: will this model, quantizer, batch and sequence length fit in memory? Nothing is loaded.

    modulora plan llama-65b --quantizer rtn-2bit --batch-size 1 --seq-len 128 --dtype float16 \\
        --device cuda --budget 24GB
    modulora plan llama-65b -q quip#-2bit --lora-targets q_proj,v_proj   # the paper's setting
    modulora plan ./my-model/config.json -q nf4 --module down_proj=rtn-4bit --json
    modulora plan llama-2-70b -q rtn-2bit --dtype bfloat16 --device cuda --world-size 4 --fsdp --budget 24GB

Exit status: 0, or 1 when a ``--budget`` is given and the plan does not fit it, 2 on bad input.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

from .common import split_names, targets_option

_DTYPES = ["float32", "float16", "bfloat16"]


def _modules(quantizer: str, modules: list[str] | None) -> str | dict[str, str]:
    """``-q rtn-2bit --module down_proj=rtn-4bit`` -> ``{"down_proj": "rtn-4bit", "*": "rtn-2bit"}``."""
    if not modules:
        return quantizer
    mapping: dict[str, str] = {}
    for m in modules:
        pattern, sep, preset = m.partition("=")
        if not sep or not pattern.strip() or not preset.strip():
            raise typer.BadParameter(f"{m!r}: write MODULE=PRESET, e.g. down_proj=rtn-4bit", param_hint="--module")
        mapping[pattern.strip()] = preset.strip()
    mapping["*"] = quantizer
    return mapping


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        model: Annotated[str, typer.Argument(help="built-in shape (llama-7b, llama-13b, llama-30b, llama-65b, "
                                             "llama-2-70b, smollm2-135m), a config.json or a model directory")],
        quantizer: Annotated[str, typer.Option("--quantizer", "-q", help="preset (see `modulora plugins`), "
                                               "'dense' for plain LoRA on the dense model, or 'qlora' for "
                                               "PEFT LoRA on bitsandbytes NF4")] = "rtn-4bit",
        module: Annotated[list[str] | None, typer.Option(help="MODULE=PRESET for modules matched by name or "
                                                         "suffix (repeatable); the rest use --quantizer")] = None,
        batch_size: Annotated[int, typer.Option(min=1)] = 1,
        seq_len: Annotated[int, typer.Option(min=1)] = 512,
        targets: Annotated[str | None, typer.Option(help="linears to quantize: comma-separated names, a regex, "
                                                    "or 'all-linear' \\[default: every decoder-block "
                                                    "linear]")] = None,
        skip: Annotated[str | None, typer.Option(help="linears to leave dense (modules_to_not_convert): "
                                                 "comma-separated names")] = None,
        lora_targets: Annotated[str | None, typer.Option(help="linears with LoRA adapters: comma-separated "
                                                         "names, a regex, or 'all-linear' \\[default: every "
                                                         "quantized linear]")] = None,
        rank: Annotated[int, typer.Option("--rank", "--r", "-r", min=1, help="LoRA rank r")] = 8,
        dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="LoRA dropout")] = 0.0,
        dora: Annotated[bool, typer.Option("--dora", help="DoRA (adds a magnitude per output)")] = False,
        dtype: Annotated[str, typer.Option(help=f"compute dtype: {', '.join(_DTYPES)}")] = "float32",
        weight_dtype: Annotated[str | None, typer.Option(help="dtype of the unquantized parts (default: "
                                                         "--dtype)")] = None,
        optimizer: Annotated[str, typer.Option(help="adamw, sgd or sgd-momentum")] = "adamw",
        gradient_checkpointing: Annotated[bool, typer.Option(help="recompute each layer in backward")] = False,
        chunk_rows: Annotated[int | None, typer.Option(min=1, help="materialize W in tiles of this many "
                                                       "rows")] = None,
        budget: Annotated[str | None, typer.Option(help="memory to fit in, e.g. 24GB or 24GiB")] = None,
        device: Annotated[str, typer.Option(help="cpu or cuda: picks the runtime allowance")] = "cpu",
        runtime: Annotated[str | None, typer.Option(help="runtime allowance to use instead, e.g. 1GiB")] = None,
        world_size: Annotated[int, typer.Option(min=1, help="processes (--batch-size is each one's); the plan "
                                                "is one process's peak")] = 1,
        fsdp: Annotated[bool, typer.Option("--fsdp", help="with --world-size N: FSDP2 shards the packed base and "
                                           "the adapters (modulora finetune --fsdp); DDP otherwise")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    ) -> None:
        """Predict the peak memory of one LoRA training step, component by component."""
        from peft import LoraConfig
        from pydantic import ValidationError

        import modulora
        from modulora.planning import parse_size
        from modulora.planning import plan as make_plan
        from modulora.planning.shapes import quantized_names

        try:
            if dtype not in _DTYPES or (weight_dtype is not None and weight_dtype not in _DTYPES + ["float64"]):
                raise typer.BadParameter(f"dtype must be one of {_DTYPES}", param_hint="--dtype")
            quantized, skipped = targets_option(targets), split_names(skip)
            # no --lora-targets: every quantized linear, by name (a LoraConfig without target_modules would
            # mean PEFT's default for the model type)
            lora_on = targets_option(lora_targets) or quantized_names(model, quantized, skipped)
            lora = LoraConfig(r=rank, lora_dropout=dropout, use_dora=dora, target_modules=lora_on)
            p = make_plan(model, _modules(quantizer, module), targets=quantized, modules_to_not_convert=skipped,
                          batch_size=batch_size, seq_len=seq_len, lora=lora,
                          dtype=dtype, weight_dtype=weight_dtype, optimizer=optimizer,
                          gradient_checkpointing=gradient_checkpointing, chunk_rows=chunk_rows, budget=budget,
                          device=device, runtime_bytes=parse_size(runtime) if runtime else None,
                          world_size=world_size, fsdp=fsdp)
        except (modulora.ModuLoRAError, ValidationError) as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
        if as_json:
            typer.echo(json.dumps(p.to_dict(), indent=2))
        else:
            from rich.console import Console

            console = Console()
            console.print(p.rich_table())
            for note in p.notes:
                console.print(f"[yellow]note:[/] {note}")
        if p.fits is False:
            raise typer.Exit(1)
