"""``modulora finetune --fsdp``: the Hugging Face ``Trainer`` over a model that FSDP2 shards itself.

accelerate's FSDP2 plugin does not run on CPU (accelerate falls back to DDP, and its DDP path refuses the
DTensor parameters FSDP2 leaves), so the job shards the model with :func:`modulora_core.fsdp.shard_model`
and tells the Trainer the model owns its distribution: ``is_distributed_loading_by_transformers``, the
Trainer's own switch for models sharded before it sees them. accelerate then wraps nothing; FSDP2
reduce-scatters the adapters' gradients itself. :class:`ShardedTrainer` shards at the start of training,
after a ``--resume`` has loaded its adapter into the whole model, and saves what is sharded gathered:

- the adapter: gathered on every process (a collective), written once by the main one, in PEFT's format,
  with the record of the base taken before sharding (the packed tensors' digests are those of the
  unsharded model, so ``--resume`` and ``modulora generate`` check it as usual);
- the optimizer state: gathered whole (``torch.distributed.checkpoint``'s full state dict, keyed by
  parameter name) into ``optimizer.pt``, and scattered back to the shards on resume.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from modulora.adapters import ADAPTER_CONFIG, MODULORA_CONFIG, base_fingerprint, quantizer_record
from modulora_core.errors import AdapterError
from modulora_core.files import staged_writes, write_json
from modulora_core.fsdp import full_trainable_state_dict, local_packed_bytes, shard_model
from modulora_core.hf import modulora_version
from modulora_core.integrity import nonfinite

from .train import ModuLoRATrainer

OPTIMIZER_NAME, SCHEDULER_NAME = "optimizer.pt", "scheduler.pt"  # the Trainer's file names


def fsdp_requested(args: Any = None) -> bool:
    """Whether the launch asks for FSDP without ``--fsdp``: ``accelerate launch`` with an FSDP config (it
    sets ``ACCELERATE_USE_FSDP``), or the Trainer's own ``fsdp`` options in ``args`` (TrainingArguments).
    ModuLoRA then shards with :func:`~modulora_core.fsdp.shard_model` (FSDP2, whatever version the config
    names): accelerate's own FSDP cannot shard the packed base (on CPU it falls back to DDP)."""
    env = os.environ.get("ACCELERATE_USE_FSDP", "false").strip().lower() in ("1", "true", "yes")
    return env or bool(getattr(args, "fsdp", None))


class ShardedTrainer(ModuLoRATrainer):
    """:class:`ModuLoRATrainer` with FSDP2: every process holds about 1/N of the packed base and of the
    adapters; saved adapters and optimizer states are gathered whole."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._record = {"modulora_version": modulora_version(), **quantizer_record(self.model),
                        "base_model": base_fingerprint(self.model)}  # the unsharded base's digests
        # The Trainer's switch for a model that owns its sharding: accelerate neither DDP-wraps nor shards it
        self.is_distributed_loading_by_transformers = True
        self._sharded = False

    def _move_model_to_device(self, model: torch.nn.Module, device: torch.device) -> None:
        """Nothing: :meth:`shard` moves the model to ``device`` one FSDP unit at a time, keeping only this
        process's shard of each there (the Trainer would move the whole packed model first)."""

    def shard(self) -> None:
        """Shard the model (once) over this process's device; the Trainer calls it before the optimizer."""
        if not self._sharded:
            shard_model(self.model, device=self.args.device)
            self._sharded = True

    def _prepare_for_training(self, *args: Any, **kwargs: Any) -> Any:
        self.shard()  # after a resume loaded its adapter into the whole model, before the optimizer exists
        return super()._prepare_for_training(*args, **kwargs)

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Gather the adapter (every process must call this) and save it once, in PEFT's format."""
        state = full_trainable_state_dict(self.model)
        if self.args.should_save:
            bad = nonfinite(state.items())
            if bad:
                raise AdapterError(f"the adapter has NaN/inf values ({', '.join(f'{n}: {c}' for n, c in bad[:3])});"
                                   f" it was not saved. Training diverged: lower --lr, or check the data")
            with staged_writes(directory, last=(ADAPTER_CONFIG,)) as stage:
                self.model.save_pretrained(str(stage), state_dict=state)
                write_json(stage / MODULORA_CONFIG, self._record)
        return Path(directory)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        self.save_adapter(output_dir or self.args.output_dir)  # save_model calls it on every process

    def _optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate's wrapper, unwrapped

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(self.model, self._optimizer(),
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.args.should_save:
            torch.save(state, os.path.join(output_dir, OPTIMIZER_NAME))
            torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        from .runs import damaged_checkpoint_error

        try:  # the adapter's optimizer state is small: every process reads it whole and keeps its shards
            state = torch.load(os.path.join(checkpoint, OPTIMIZER_NAME), map_location="cpu", weights_only=True)
            set_optimizer_state_dict(self.model, self._optimizer(), state,
                                     options=StateDictOptions(full_state_dict=True))
            self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, SCHEDULER_NAME),
                                                         weights_only=True))
        except (OSError, RuntimeError, EOFError, ValueError, KeyError) as e:
            raise damaged_checkpoint_error(
                Path(checkpoint), f"its optimizer state cannot be read into the sharded adapter ({type(e).__name__}: "
                f"{e}); a checkpoint of a run without --fsdp resumes without --fsdp",
                Path(self.args.output_dir).parent) from e


def packed_bytes_per_process(model: torch.nn.Module) -> list[int]:
    """The packed bytes each process holds (a collective under torch.distributed)."""
    import torch.distributed as dist

    mine = local_packed_bytes(model)
    if not (dist.is_available() and dist.is_initialized()):
        return [mine]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return [int(b) for b in every]
