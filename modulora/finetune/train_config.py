"""TrainConfig: the training hyper-parameters of ``modulora finetune`` (light: no transformers import)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    """Training hyper-parameters: the single source of ``modulora finetune``'s training options."""

    model_config = ConfigDict(extra="forbid")

    learning_rate: float = Field(1e-3, gt=0, description="peak learning rate (AdamW)")
    max_steps: int = Field(60, description="optimizer steps; <= 0: train --epochs epochs instead")
    epochs: float = Field(1.0, gt=0, description="epochs, when --max-steps <= 0")
    batch_size: int = Field(4, ge=1, description="examples per step and process")
    grad_accum: int = Field(1, ge=1, description="gradient accumulation steps")
    max_length: int = Field(192, ge=8, description="tokens per example (prompt + answer); longer ones are cut")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of steps of linear warm-up")
    scheduler: str = Field("cosine", description="learning-rate schedule (transformers' names)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0: off)")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in backward")
    seed: int = Field(0, description="seed for LoRA init, data order and dropout")
    logging_steps: int = Field(10, ge=1, description="log the training loss every N steps")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    eval_steps: int = Field(0, ge=0, description="validation loss every N steps (0: never during training)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints to keep")
