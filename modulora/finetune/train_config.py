"""The options of ``modulora finetune`` (light: no transformers import): :class:`FinetuneConfig` says what to
finetune (model, quantization, adapters, task, evaluation), :class:`TrainConfig` how to train it. Their field
descriptions are the command's help texts."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

RUN_CONFIG = "run_config.json"  # in --out: the options of the run and its fingerprint; --resume reuses them


class FinetuneConfig(BaseModel):
    """What the finetune job runs. Quantization targets and LoRA targets are chosen apart."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Hugging Face model directory or id, or a quantized checkpoint "
                              "(`modulora quantize`, save_pretrained, GPTQ) [default: SmolLM2-135M-Instruct]")
    quantizer: str | None = Field(None, description="quantizer preset (see `modulora plugins`) [default: "
                                  "quip#-2bit when it can run, else nf4]")
    targets: list[str] | str | None = Field(None, description="linears to quantize: comma-separated names "
                                            "(q_proj,v_proj), a regex, or all-linear [default: every linear of "
                                            "the decoder blocks]")
    skip: list[str] = Field(default_factory=list, description="linears to leave dense (modules_to_not_convert): "
                            "comma-separated names, e.g. down_proj")
    chunk_rows: int | None = Field(None, ge=1, description="materialize W in tiles of N rows")
    calibration_samples: int = Field(32, ge=1, description="training examples used to calibrate quantizers "
                                     "that need it (quip#, optq)")
    lora_targets: list[str] | str | None = Field(None, description="linears that get LoRA adapters: "
                                                 "comma-separated names, a regex, or all-linear [default: every "
                                                 "quantized linear]")
    rank: int = Field(8, ge=1, description="LoRA rank r")
    alpha: float = Field(16.0, description="LoRA alpha (the update is scaled by alpha/r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    dora: bool = Field(False, description="DoRA: learn a magnitude per output feature besides the LoRA update")
    rslora: bool = Field(False, description="rsLoRA: scale the update by alpha/sqrt(r) instead of alpha/r")
    lora_init: Literal["default", "residual"] = Field(
        "default", description="LoRA initialization: default (PEFT's, B = 0) or residual (start at the quantization "
        "error, W_q + s·B·A ≈ W, activation-aware where the quantizer calibrates; needs a dense --model)")
    lora_init_iterations: int = Field(
        1, ge=1, le=32, description="with --lora-init residual: rounds of LoftQ-style alternation (quantize "
        "W - B·A again, refit B·A to the new error); each round costs one more quantization of every layer")
    task: str = Field("docsum", description="built-in task: docsum (ROUGE) or docmodule (accuracy)")
    data: Path | None = Field(None, description="your own data (.jsonl/.json/.csv/.txt or a saved datasets "
                              "directory); replaces --task")
    out: Path = Field(Path("modulora-out"), description="output directory")
    eval_size: int = Field(32, ge=0, description="validation examples scored before and after (0: no "
                           "evaluation)")
    eval_dense: bool = Field(False, description="also score the unquantized model")
    eval_merged: bool = Field(True, description="generate answers for scoring with a merged dense copy (same "
                              "weights, several times faster; off for models too big to hold dense)")
    chat_template: bool | None = Field(None, description="render prompts with the tokenizer's chat template "
                                       "[default: when it has one]")

    @model_validator(mode="after")
    def _iterations_need_residual(self) -> FinetuneConfig:
        if self.lora_init_iterations > 1 and self.lora_init != "residual":
            raise ValueError(f"lora_init_iterations={self.lora_init_iterations} alternates quantization with the "
                             f"residual LoRA init: add --lora-init residual, or leave --lora-init-iterations at 1")
        return self


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
    fsdp: bool = Field(False, description="under torchrun: shard the packed base and the adapters across the "
                       "processes with FSDP2, each holding about 1/N of the packed bytes (DDP otherwise)")
    seed: int = Field(0, description="seed for LoRA init, data order and dropout")
    logging_steps: int = Field(10, ge=1, description="log the training loss every N steps")
    save_steps: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    eval_steps: int = Field(0, ge=0, description="validation loss every N steps (0: never during training)")
    save_total_limit: int = Field(2, ge=1, description="checkpoints to keep (the oldest are deleted); keep 2 or "
                                  "more so that a damaged last checkpoint leaves one to resume from")
