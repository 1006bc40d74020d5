"""The finetune job behind ``modulora finetune``, top to bottom (every process runs it under torchrun):

1. the task (bad data fails here, before any model loads) and the Trainer's arguments (they set up DDP);
2. the quantized base (``modulora.load(..., lora=None)``): quantized once by the main process, calibrated on
   the task's training text when the quantizer needs it, and saved to ``OUT/base``; reloaded from there on
   resume and by the other processes, so no process quantizes twice;
3. PEFT LoRA on top (``peft.get_peft_model``), initialised from the seed, the same on every process; the
   model is scored with its adapter disabled: "before";
4. training with the Hugging Face Trainer: adapter-only checkpoints in ``OUT/checkpoints``; Ctrl-C saves one
   and stops, and ``resume=True`` continues from the last one on the same loss curve;
   with ``train.fsdp`` under torchrun, FSDP2 shards the packed base and the adapters (:mod:`.sharded`);
5. the adapter saved (``modulora.save_adapter``: PEFT's format) to ``OUT/adapter`` and scored: "after".

:func:`run` returns the metrics (also in ``OUT/metrics.json``); printing them is the command's business.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

import modulora
from modulora_core.errors import CheckpointError, ModuLoRAError

from .checks import clear_run, holds_run
from .console import say
from .encoding import EncodedDataset, PadCollator, context_length, pad_id
from .models import (
    add_lora,
    default_quantizer,
    is_quantized,
    load_dense,
    load_tokenizer,
    lora_config,
    preset_of,
    quantize,
    resolve_model,
    task_texts,
)
from .runs import (
    FINGERPRINT,
    check_same_run,
    checkpoint_damage,
    damaged_checkpoint_error,
    read_run_config,
    run_fingerprint,
    write_run_config,
)
from .sharded import ShardedTrainer, fsdp_requested, packed_bytes_per_process
from .tasks import Task, data_task, get_task
from .train import (
    GracefulStop,
    ModuLoRATrainer,
    exclude_frozen_from_ddp,
    last_checkpoint,
    loss_history,
    training_arguments,
)
from .train_config import FinetuneConfig, TrainConfig

METRICS = "metrics.json"


def task_of(job: FinetuneConfig) -> Task:
    """The user's data (``job.data``) or the built-in task ``job.task``."""
    return data_task(job.data) if job.data else get_task(job.task)


def run(job: FinetuneConfig, train: TrainConfig, *, resume: bool = False, overwrite: bool = False,
        options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Quantize, attach adapters, score, train, save, score again; see the module docstring. Returns the
    metrics; ``metrics["interrupted"]`` is True when Ctrl-C stopped training (a checkpoint was saved).

    Before anything in ``job.out`` changes: a new run refuses an ``out`` that holds another run unless
    ``overwrite``; ``resume`` refuses a run made with another model, data, quantizer or adapter shape, and a
    damaged last checkpoint. ``options`` (the command's) are then saved with the run's fingerprint."""
    t0 = time.perf_counter()
    out = Path(job.out)
    ckpt_dir, base_dir, adapter_dir = out / "checkpoints", out / "base", out / "adapter"

    # 1. the task, the model and the run in --out, checked before anything is written
    task = task_of(job)
    model_path = resolve_model(job.model)
    if job.quantizer is None and not is_quantized(model_path):
        job = job.model_copy(update={"quantizer": _default_quantizer()})
    fingerprint = run_fingerprint(job, model_path, job.quantizer)
    resume_from = _check_resume(out, ckpt_dir, fingerprint) if resume else None
    if not resume and holds_run(out) and not overwrite:
        raise CheckpointError(f"--out {out} holds an earlier run ({', '.join(holds_run(out))}); continue it with "
                              f"--resume, replace it with --overwrite, or pass another --out")
    val = task.examples("validation")[: job.eval_size]
    args = training_arguments(train, ckpt_dir, has_eval=bool(val))  # sets up torch.distributed under torchrun
    main = args.should_save
    metrics: dict[str, Any] = read_metrics(out) if resume else {}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if overwrite and not resume and holds_run(out):
            clear_run(out, keep=model_path)
        if options is not None:
            write_run_config(out, options, fingerprint)

    # 2. the quantized base: made once by the main process and saved; reloaded on resume and by the others
    lora_init = None  # residual factors, only where the dense weights are in hand (quantizing now)
    if job.lora_init == "residual" and is_quantized(model_path):
        raise ModuLoRAError(f"--lora-init residual needs the dense weights, and {model_path} is quantized already; "
                            f"pass the dense --model")
    with args.main_process_first(desc="load and quantize the model"):
        if is_quantized(base_dir) and (resume or not main):
            tok, base = load_tokenizer(base_dir), modulora.load(str(base_dir), lora=None, chunk_rows=job.chunk_rows)
        elif is_quantized(model_path):  # quantized already (modulora quantize, GPTQ, ...): used as it is
            tok = load_tokenizer(model_path)
            base = modulora.load(model_path, job.quantizer, lora=None, chunk_rows=job.chunk_rows)
            base_dir = Path(model_path)
        else:
            tok, dense = load_tokenizer(model_path), load_dense(model_path)
            preset = job.quantizer
            max_len = _max_length(train.max_length, dense)
            if job.eval_dense and val and "dense" not in metrics:
                say("scoring the unquantized model ...")
                metrics["dense"] = score(dense, tok, task, val, max_len, job, train)
            lora_init = (modulora.LoraInit(rank=job.rank, iterations=job.lora_init_iterations)
                         if job.lora_init == "residual" else None)
            base = quantize(dense, preset, targets=job.targets, skip=job.skip, chunk_rows=job.chunk_rows,
                            calibration_texts=task_texts(task), tokenizer=tok,
                            calibration_samples=job.calibration_samples, seq_len=max_len, lora_init=lora_init)
            del dense
            if main:
                modulora.save_quantized(base, base_dir, tokenizer=tok)
    quantizer = preset_of(base)
    max_len = _max_length(train.max_length, base)

    # 3. PEFT LoRA on top: the same initialisation on every process and in every code path
    torch.manual_seed(train.seed)
    lora = lora_config(base, r=job.rank, alpha=job.alpha, dropout=job.dropout, targets=job.lora_targets,
                       dora=job.dora, rslora=job.rslora)
    model = add_lora(base, lora)  # peft.get_peft_model
    if lora_init is not None:  # made with the base, by the main process; DDP broadcasts rank 0's adapter
        rounds = f" after {lora_init.iterations} rounds of alternation" if lora_init.iterations > 1 else ""
        say(f"LoRA initialized from the quantization residual on {len(modulora.apply_lora_init(model, lora_init.factors))}"
            f" linears{rounds}")
    n_trainable, _ = model.get_nb_trainable_parameters()
    say(f"task: {task.description}; {len(task.examples('train'))} training examples, {len(val)} validation "
        f"examples scored; quantizer {quantizer}; {_describe(lora)}, {n_trainable:,} trainable parameters; "
        f"output {out}")
    if main and val and "before" not in metrics:
        say(f"scoring {quantizer} before finetuning ...")
        with model.disable_adapter():
            metrics["before"] = score(model, tok, task, val, max_len, job, train)
        write_metrics(out, metrics)

    # 4. training
    train_ds = EncodedDataset(tok, task.examples("train"), max_len, job.chat_template, what="training examples")
    eval_ds = (EncodedDataset(tok, val, max_len, job.chat_template, what="validation examples")
               if train.eval_steps and val else None)
    # FSDP2 shards the model when training starts (sharded.py): --fsdp, or accelerate launch's FSDP config
    fsdp = (train.fsdp or fsdp_requested(args)) and args.world_size > 1
    if args.world_size > 1 and not fsdp:
        exclude_frozen_from_ddp(model)
    stopper = GracefulStop().install()
    trainer = (ShardedTrainer if fsdp else ModuLoRATrainer)(
        model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
        data_collator=PadCollator(pad_id(tok)), callbacks=[stopper])
    length = f"{train.max_steps} steps" if train.max_steps > 0 else f"{train.epochs:g} epochs"
    say(f"training: {length} of {train.batch_size * train.grad_accum * args.world_size} examples"
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
    metrics.update({"steps": step, "max_steps": max_steps, "checkpoints": str(ckpt_dir)})
    if stopper.stopped_at is not None and step < max_steps:
        if main:
            write_metrics(out, metrics)
        return {**metrics, "interrupted": True}

    # 5. the adapter, scored again
    metrics["packed_bytes_per_process"] = packed_bytes_per_process(model)
    if fsdp:  # gathered by every process, saved once; the sharded model is not scored (modulora evaluate is)
        trainer.save_adapter(adapter_dir)
    elif main:
        modulora.save_adapter(model, adapter_dir)
    if main and val and fsdp:
        say(f"not scored after finetuning under --fsdp; score the adapter with: modulora evaluate --model "
            f"{base_dir} --adapter {adapter_dir}")
    elif main and val:
        say("scoring after finetuning ...")
        metrics["after"] = score(model, tok, task, val, max_len, job, train)
    if main:
        metrics.update({
            "task": task.name, "metric": task.metric, "quantizer": quantizer, "lora": _describe(lora),
            "trainable_parameters": n_trainable, "validation_examples": len(val),
            "train_seconds": round(train_seconds, 1), "seconds": round(time.perf_counter() - t0, 1),
            "adapter": str(adapter_dir), "base": str(base_dir), "world_size": args.world_size,
        })
        write_metrics(out, metrics)
    return metrics


def _check_resume(out: Path, ckpt_dir: Path, fingerprint: dict[str, Any]) -> Path | None:
    """The checkpoint a ``--resume`` continues from (None: the run stopped before its first one, so it starts
    again, reusing a saved base), after checking it is the same run and the checkpoint is readable."""
    saved = read_run_config(out)
    if not saved and not holds_run(out):
        raise CheckpointError(f"--resume: {out} holds no run to continue; run without --resume to start one")
    check_same_run(out, saved.get(FINGERPRINT), fingerprint)
    ck = last_checkpoint(ckpt_dir)
    if ck is not None and (why := checkpoint_damage(ck)) is not None:
        raise damaged_checkpoint_error(ck, why, out)
    return ck


def score(model: Any, tok: Any, task: Task, val: list, max_len: int, job: FinetuneConfig,
          train: TrainConfig) -> dict[str, Any]:
    """Loss, perplexity and the task's metric on ``val`` (:func:`evaluate_examples`)."""
    from .console import is_main_process
    from .evaluate import evaluate_examples

    return evaluate_examples(model, tok, task, val, max_length=max_len, batch_size=max(8, train.batch_size),
                             chat=job.chat_template, progress=is_main_process(), merged=job.eval_merged)


def _default_quantizer() -> str:
    preset, note = default_quantizer()
    if note:
        say(f"[yellow]{note}[/]")
    return preset


def _max_length(wanted: int, model: Any) -> int:
    ctx_len = context_length(model)
    if ctx_len and wanted > ctx_len:
        say(f"[yellow]--max-length {wanted} is longer than the model's context ({ctx_len}); using {ctx_len}[/]")
        return int(ctx_len)
    return int(wanted)


def _describe(lora: Any) -> str:
    """``LoRA r=8, alpha=16 on q_proj, v_proj`` (with DoRA / rsLoRA when on)."""
    kind = "DoRA" if lora.use_dora else "LoRA"
    targets = lora.target_modules
    where = ", ".join(sorted(targets)) if isinstance(targets, (set, list, tuple)) else str(targets)
    if len(where) > 80:
        where = f"{len(targets)} modules"
    return (f"{kind} r={lora.r}, alpha={lora.lora_alpha:g}" + (" (rsLoRA)" if lora.use_rslora else "")
            + f" on {where}")


def read_metrics(out: Path) -> dict[str, Any]:
    p = Path(out) / METRICS
    return json.loads(p.read_text()) if p.is_file() else {}


def write_metrics(out: Path, metrics: dict[str, Any]) -> None:
    from modulora_core.files import staged_writes, write_json

    with staged_writes(out) as stage:
        write_json(stage / METRICS, metrics)
