"""``modulora.load``: the one-call shortcut for quantize (or reload) + PEFT adapters.

It is ``from_pretrained(..., quantization_config=ModuLoRAConfig(...))`` followed by
``peft.get_peft_model(model, lora)``, spelled once; every piece also works on its own.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modulora_core import (
    CheckpointError,
    ModuLoRAConfig,
    Preset,
    QuantizeOptions,
    QuantizerConfig,
    UnknownQuantizerError,
    available_presets,
    get_preset,
    iter_quantized_layers,
    mark_quantized,
    quantize_model,
)
from modulora_core.checkpoint import checkpoint_kind, load_legacy
from modulora_core.errors import ModuLoRAError
from modulora_core.files import remove_stale_stages
from modulora_core.integrity import check_finite
from modulora_core.lora_init import LoraInit, apply_lora_init
from modulora_core.registry import get_registry

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

PresetLike = str | QuantizerConfig | Preset  # a preset name, a plugin config, or resolved
DEFAULT = "default"  # lora=DEFAULT: r=8, alpha=16 on every quantized module


def default_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0,
                 target_modules: list[str] | str | None = None) -> LoraConfig:
    """PEFT's ``LoraConfig`` with ModuLoRA's defaults: LoRA on every quantized module (leaf names)."""
    from peft import LoraConfig

    if target_modules is None:
        target_modules = sorted({n.rsplit(".", 1)[-1] for n, _ in iter_quantized_layers(model)})
    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                      task_type="CAUSAL_LM")


def load(model: PreTrainedModel | str | os.PathLike, preset: PresetLike | None = None, *,
         lora: LoraConfig | str | None = DEFAULT, targets: list[str] | str | None = None,
         modules_to_not_convert: list[str] | None = None, calibration: Any = None,
         n_samples: int | None = None, seq_len: int | None = None, chunk_rows: int | None = None,
         torch_dtype: torch.dtype | None = None, lora_init: str | LoraInit | None = None) -> PeftModel | PreTrainedModel:
    """Quantize a causal LM (or reload a quantized one) and attach PEFT LoRA adapters.

    ``model``: a transformers causal LM (quantized in place), a path or model id (loaded in ``torch_dtype``,
    float32 by default), or a quantized checkpoint (ours, or one a plugin reads, e.g. GPTQ), loaded packed
    as it is when ``preset`` is None. ``targets`` / ``modules_to_not_convert`` choose what is
    quantized (default: every linear of the decoder blocks); ``lora`` chooses where adapters go, apart:
    a ``peft.LoraConfig`` (``target_modules=["q_proj", "v_proj"]``, ``use_dora=True``, ...), the default
    (r=8, alpha=16 on every quantized module), or None for no adapter. Returns a ``PeftModel``, or the
    quantized transformers model when ``lora`` is None.

    ``lora_init="residual"`` (or a :class:`~modulora_core.lora_init.LoraInit` for alternation and other
    options) starts the adapters at the quantization error, so that W_q + s·B·A ≈ W (activation-aware where
    the quantizer calibrates); PEFT's own init (B = 0) otherwise. It needs the dense model: for one quantized
    already, use ``modulora.init_lora_from_residual`` with its dense source.
    """
    if isinstance(lora, str) and lora != DEFAULT:
        raise ValueError(f"lora must be a peft.LoraConfig, None, or {DEFAULT!r}; got {lora!r}")
    init = _lora_init(lora_init, lora)
    base = _quantized_base(model, preset, targets=targets, skip=modules_to_not_convert,
                           calibration=calibration, n_samples=n_samples, seq_len=seq_len,
                           chunk_rows=chunk_rows, torch_dtype=torch_dtype, lora_init=init)
    if lora is None:
        return base
    from peft import get_peft_model

    if isinstance(lora, str):
        lora = default_lora(base)
    peft_model = get_peft_model(base, lora)
    if init is not None:
        apply_lora_init(peft_model, init.factors)
        init.factors.clear()  # the adapter holds them now
    return peft_model


LORA_INITS = ("default", "residual")  # what --lora-init accepts


def _lora_init(lora_init: str | LoraInit | None, lora: Any) -> LoraInit | None:
    if lora_init is None or lora_init == "default":
        return None
    if isinstance(lora_init, LoraInit):  # with lora=None its factors wait there for apply_lora_init
        return lora_init
    if lora is None:
        raise ValueError("lora_init needs adapters to initialize; pass lora= (a LoraConfig or 'default'), or "
                         "a LoraInit to collect the factors and apply_lora_init them later")
    if lora_init != "residual":
        raise ValueError(f"lora_init must be one of {', '.join(LORA_INITS)} or a LoraInit; got {lora_init!r}")
    rank = 8 if isinstance(lora, str) else max([lora.r, *getattr(lora, "rank_pattern", {}).values()])
    return LoraInit(rank=rank)


def _quantized_base(model: Any, preset: PresetLike | None, *, targets: Any, skip: Any, calibration: Any,
                    n_samples: int | None, seq_len: int | None, chunk_rows: int | None,
                    torch_dtype: torch.dtype | None, lora_init: LoraInit | None = None) -> PreTrainedModel:
    is_path = isinstance(model, (str, os.PathLike))
    kind = checkpoint_kind(model) if is_path else None
    if lora_init is not None and (kind is not None or preset is None):
        raise ModuLoRAError(f"lora_init needs the dense weights, and {_describe(model)} is quantized already (or "
                            f"no preset was given); quantize the dense model, or call "
                            f"modulora.init_lora_from_residual(peft_model, dense_model)")
    if kind is not None:  # already quantized by ModuLoRA: load it packed
        remove_stale_stages(model)  # what a killed save left behind
        if kind == "legacy":
            base = load_legacy(model, chunk_rows=chunk_rows)
        else:
            from safetensors import SafetensorError
            from transformers import AutoModelForCausalLM

            try:
                base = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype)
            except SafetensorError as e:  # its message names neither the file nor the fix
                raise CheckpointError(f"cannot read the weights in {str(model)!r} ({e}): a *.safetensors file "
                                      f"there is truncated or corrupted; save the model again") from e
            if chunk_rows is not None:
                for _, layer in iter_quantized_layers(base):
                    layer.chunk_rows = chunk_rows
        if preset is not None:
            _check_requested(model, base, preset)
        return base
    loader = get_registry().detect_format(model)
    if loader is not None:  # quantized elsewhere (GPTQ, bitsandbytes): converted as it is
        base = loader(model, chunk_rows=chunk_rows)
        if preset is not None:
            _check_requested(model, base, preset)
        return base
    if preset is None:
        raise UnknownQuantizerError(
            f"no preset given and {_describe(model)} is not a quantized checkpoint that ModuLoRA or an "
            f"installed plugin reads. Pass preset=one of: {', '.join(available_presets()) or '(none)'}")
    bq = preset if isinstance(preset, Preset) else get_preset(preset)
    qc = ModuLoRAConfig(bq, targets=targets, modules_to_not_convert=skip, calibration=calibration,
                        n_samples=n_samples, seq_len=seq_len, chunk_rows=chunk_rows)
    if is_path:
        from transformers import AutoModelForCausalLM

        if lora_init is None:
            return AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype or torch.float32,
                                                        quantization_config=qc)
        # the residual needs each dense weight: load dense, then quantize in place below
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype or torch.float32)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    check_finite(model)  # one NaN norm would make every loss NaN; name it now
    quantize_model(model, bq, QuantizeOptions(targets=targets, skip=tuple(skip or ()), calibration=calibration,
                                              n_samples=n_samples, seq_len=seq_len, chunk_rows=chunk_rows,
                                              lora_init=lora_init))
    qc.calibration = None
    return mark_quantized(model, qc)


def _check_requested(where: Any, base: nn.Module, preset: PresetLike) -> None:
    import json

    bq = preset if isinstance(preset, Preset) else get_preset(preset)
    want = json.loads(bq.config.to_json())
    for _, layer in iter_quantized_layers(base):
        have = json.loads(layer.packed.config.to_json())
        if have != want:
            raise CheckpointError(
                f"{_describe(where)} holds weights quantized with {layer.preset!r} ({json.dumps(have)}), not the "
                f"requested {bq.name!r} ({json.dumps(want)}): its dense weights are gone. Omit preset= to load "
                f"it as saved, or quantize the dense model with {bq.name!r}")


def _describe(model: Any) -> str:
    return repr(str(model)) if isinstance(model, (str, os.PathLike)) else f"a {type(model).__name__} instance"


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters (what PEFT left trainable: LoRA A/B, DoRA magnitudes, ...)."""
    return [p for p in model.parameters() if p.requires_grad]

