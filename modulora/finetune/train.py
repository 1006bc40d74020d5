"""Training PEFT adapters on a ModuLoRA base with the Hugging Face ``Trainer`` as it ships.

The Trainer already saves a ``PeftModel``'s checkpoints as adapters only (PEFT's format; never the packed
base, which is saved once). :class:`ModuLoRATrainer` changes only how: the adapter goes through
``modulora.save_adapter`` (PEFT's files plus the record of the base it fits, checked again on resume) and a
checkpoint, with its optimizer, scheduler, RNG and trainer state, appears under its final name only when
complete. :class:`GracefulStop` turns Ctrl-C (or SIGTERM) into "save a checkpoint at the end of this step
and stop", so an interrupted run always resumes. Several processes
(``torchrun``, ``accelerate launch``) train with DDP (gloo on CPU); the frozen base is never broadcast.
"""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint, rotate_checkpoints

from modulora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter
from modulora_core.errors import CheckpointError, ModuLoRAError
from modulora_core.integrity import nonfinite

from .train_config import TrainConfig

STAGING_DIR = ".checkpoint-staging"  # checkpoints are written here, then renamed into place
TRAINER_STATE = "trainer_state.json"


def training_arguments(cfg: TrainConfig, output_dir: str | os.PathLike, *, progress: bool = True,
                       has_eval: bool = False, checkpoints: bool = True) -> TrainingArguments:
    """``TrainingArguments`` for ``cfg``: CPU-safe (gloo for DDP), no reporting integrations, and (with
    ``checkpoints``) a checkpoint at least at the end of training, so a run can be resumed or extended."""
    cpu = not torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch set it
    steps = cfg.max_steps if cfg.max_steps > 0 else -1
    return TrainingArguments(
        output_dir=str(output_dir), per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size, gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate, max_steps=steps, num_train_epochs=cfg.epochs,
        lr_scheduler_type=cfg.scheduler, warmup_steps=cfg.warmup_ratio, weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm, activation_checkpointing=cfg.gradient_checkpointing,
        seed=cfg.seed, data_seed=cfg.seed, logging_steps=cfg.logging_steps, logging_first_step=True,
        save_strategy="steps" if checkpoints else "no", save_steps=cfg.save_steps or 10**9,
        save_total_limit=cfg.save_total_limit,
        eval_strategy="steps" if (cfg.eval_steps and has_eval) else "no", eval_steps=cfg.eval_steps or None,
        report_to="none", remove_unused_columns=False, use_cpu=cpu,
        ddp_backend="gloo" if cpu and several else None,
        ddp_find_unused_parameters=False, ddp_broadcast_buffers=False, dataloader_num_workers=0,
        disable_tqdm=not progress, bf16=False, fp16=False,
    )


def exclude_frozen_from_ddp(model: torch.nn.Module) -> list[str]:
    """Tell DDP to skip every buffer (the packed weights) and frozen parameter: nothing is broadcast at
    wrap time or before each forward; every process loaded the same base. Only the trainable adapter
    parameters (LoRA A/B, DoRA magnitudes) are reduced."""
    names = [n for n, p in model.named_parameters() if not p.requires_grad]
    names += [n for n, _ in model.named_buffers()]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    return names


def _unwrap(trainer: Trainer, model: torch.nn.Module | None) -> torch.nn.Module:
    return trainer.accelerator.unwrap_model(model if model is not None else trainer.model)


class ModuLoRATrainer(Trainer):
    """The stock ``Trainer`` on a ``PeftModel``; only saving and loading the adapter differ (recorded with
    its base and checked against it, atomic)."""

    _staging: Path | None = None

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # The Trainer would call PeftModel.save_pretrained; save_adapter does that and adds the record of
        # the base (modulora_config.json). The base itself is saved once, by modulora.save_quantized.
        if self.args.should_save:
            save_adapter(_unwrap(self, None), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        peft_model = _unwrap(self, model)
        load_adapter(peft_model, resume_from_checkpoint, adapter_name=peft_model.active_adapter,
                     is_trainable=True)

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any
                      ) -> torch.Tensor:
        # The Trainer logs a NaN loss as 0 and steps on; we stop at the first non-finite loss or gradient,
        # before the optimizer step, so no NaN reaches the adapter or a checkpoint.
        loss = super().training_step(model, inputs, *args, **kwargs)
        check_step(_unwrap(self, model), inputs, loss, self.state.global_step + 1)
        return loss

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as e:
            from .runs import damaged_checkpoint_error

            raise damaged_checkpoint_error(Path(checkpoint or ""), f"its optimizer or scheduler state cannot be read "
                                           f"({type(e).__name__}: {e})", Path(self.args.output_dir).parent) from e

    def _get_output_dir(self, trial: Any) -> str:
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        # The Trainer writes checkpoint-N file by file; we let it write into a staging folder and rename
        # the finished folder into place, so a crash mid-save never leaves a checkpoint-N to resume from.
        root = Path(self._get_output_dir(trial))
        staging = root / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self._staging = staging
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            publish_dir(staging / name, root / name)
            shutil.rmtree(staging, ignore_errors=True)
            rotate_checkpoints(output_dir=str(root), save_total_limit=self.args.save_total_limit,
                               use_mtime=False)
        self.accelerator.wait_for_everyone()


class NonFiniteError(ModuLoRAError):
    """Training produced a NaN/inf loss or gradient."""


def check_step(model: torch.nn.Module, inputs: dict[str, Any], loss: torch.Tensor, step: int) -> None:
    """Raise :class:`NonFiniteError` when ``loss`` or a trainable parameter's gradient is NaN/inf, naming
    the damaged weights, or else the first layer whose output went non-finite."""
    named = [(n, _local(p.grad)) for n, p in model.named_parameters() if p.requires_grad and p.grad is not None]
    flags = [torch.isfinite(loss.detach()).all(), *(torch.isfinite(g).all().to(loss.device) for _, g in named)]
    if bool(torch.stack(flags).all()):  # one host sync per step, not one per adapter tensor
        return
    grads = nonfinite(named)
    what = f"the loss is {float(loss.detach().float().mean())}" if not torch.isfinite(loss.detach()).all() else (
        f"the gradients of {len(grads)} adapter tensors are NaN/inf (e.g. {grads[0][0]})")
    weights = nonfinite([*model.named_parameters(), *model.named_buffers()])
    if weights:
        cause = (f"these weights hold NaN/inf: {', '.join(n for n, _ in weights[:3])}: the model is damaged, use an "
                 f"undamaged copy")
    else:
        layer = first_nonfinite_layer(model, inputs)
        cause = (f"the first layer whose output is NaN/inf: {layer}; " if layer else "") + (
            "training diverged: lower --lr (or --max-grad-norm), or check the data")
    raise NonFiniteError(f"training stopped at step {step}: {what}. {cause}. Nothing of this step was applied "
                         f"or saved; the last checkpoint (if any) is intact")


def _local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (FSDP2's gradients), or ``t``."""
    return t.to_local() if hasattr(t, "to_local") else t


def first_nonfinite_layer(model: torch.nn.Module, inputs: dict[str, Any]) -> str | None:
    """The first module (in execution order) whose output holds NaN/inf on ``inputs``, or None."""
    found: list[str] = []

    def hook(name: str) -> Any:
        def fn(_m: Any, _i: Any, out: Any) -> None:
            t = out[0] if isinstance(out, (tuple, list)) else getattr(out, "logits", out)
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if n]
    try:
        with torch.no_grad():
            model(**inputs)
    except Exception:  # noqa: BLE001, S110 - a diagnosis only: the NonFiniteError is what matters
        pass
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else None


def publish_dir(src: Path, dst: Path) -> None:
    """Move the finished folder ``src`` to ``dst`` (replacing an older ``dst``) with atomic renames."""
    old = dst.with_name(dst.name + ".old")
    if dst.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def is_complete_checkpoint(d: Path) -> bool:
    return all((d / f).is_file() for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAINER_STATE))


def last_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The newest complete ``checkpoint-N`` in ``directory``, or None."""
    d = Path(directory)
    if not d.is_dir():
        return None
    found = get_last_checkpoint(str(d))
    if found is None:
        return None
    if not is_complete_checkpoint(Path(found)):
        raise CheckpointError(f"{found} is incomplete (it lacks the adapter or {TRAINER_STATE}); delete it "
                              f"to resume from the checkpoint before it")
    return Path(found)


def collective_device() -> torch.device:
    """Where a tensor for a collective of the default process group must live: NCCL reduces only CUDA
    tensors (it rejects a CPU one), gloo and the others take CPU tensors."""
    if "nccl" in str(torch.distributed.get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class GracefulStop(TrainerCallback):
    """First Ctrl-C (SIGINT) or SIGTERM: finish the current optimizer step, save a checkpoint, stop training.
    A second Ctrl-C interrupts at once. Under DDP the processes agree (all-reduce) before stopping."""

    def __init__(self) -> None:
        self.requested = False
        self.stopped_at: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def install(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def uninstall(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)
        self._previous.clear()

    def on_step_end(self, args: TrainingArguments, state: Any, control: Any, **kwargs: Any) -> Any:
        stop = self.requested
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor([int(stop)], device=collective_device())
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control


def loss_history(trainer: Trainer) -> list[tuple[int, float]]:
    """``(step, training loss)`` pairs the Trainer logged."""
    return [(int(h["step"]), float(h["loss"])) for h in trainer.state.log_history if "loss" in h]
