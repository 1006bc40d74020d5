"""Model surgery: quantize a causal LM's linears into QuantizedLinear, and build one from packed tensors.

``quantize_model`` swaps every targeted ``nn.Linear`` for a :class:`QuantizedLinear`, one layer at a
time (the dense weight is dropped as soon as its packed form exists), calibrating block by block where the
quantizer needs it. The helpers here (targets, tied tensors, meta building, ``replace_linear``) are public
for plugin loaders; the "packed tensors -> model" builder is :func:`modulora_core.checkpoint.build_quantized_model`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import torch
from torch import nn

from .calibrate import decoder_blocks, quantize_blockwise
from .calibration_data import Calibration, calibration_tokens, resolve_calibration
from .coverage import warn_dense
from .errors import CalibrationError, CheckpointError, ModuLoRAError, TargetModulesError
from .experts import unfuse_experts
from .layouts import CONV1D, is_conv1d, is_quantizable, is_router, linear_weight, matches_target
from .lora_init import LoraInit
from .qlinear import QuantizedLinear, iter_quantized_layers
from .quantizer import PackedWeight, Quantizer
from .registry import Preset, get_preset

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

T = TypeVar("T", bound=Callable[..., Any])
Targets = list[str] | str | None  # PEFT semantics: suffixes, a regex, "all-linear", or None (decoder blocks)


# -- choosing modules ---------------------------------------------------------------------------------------
def select_targets(model: nn.Module, targets: Targets, skip: Iterable[str] = ()) -> list[str]:
    """Names of the linear modules to quantize, minus those matching ``skip`` (suffixes).

    Linear modules: ``nn.Linear``, GPT-2's ``Conv1D`` and, once :func:`unfuse_experts` ran, each expert's
    matrices. ``targets`` None: every linear of the decoder blocks but MoE routers (never embeddings or the
    LM head); ``"all-linear"``: every linear but routers and the LM head (PEFT's meaning, routers aside).
    ``TargetModulesError`` when none match.
    """
    linears = [n for n, m in model.named_modules() if is_quantizable(m)]
    if targets is None:
        blocks = decoder_blocks(model)
        if blocks is None:
            raise TargetModulesError(
                f"found no decoder-block ModuleList in {type(model).__name__}; pass targets=[...] naming "
                f"linears such as {linears[:6]}")
        names = [n for n in linears if n.startswith(blocks + ".") and not is_router(n)]
    elif targets == "all-linear":
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in linears if model.get_submodule(n) is not out and not is_router(n)]
    else:
        try:
            names = [n for n in linears if matches_target(n, targets)]
        except re.error as e:
            raise TargetModulesError(f"targets {targets!r} is not a valid regex: {e}") from e
    skip = list(skip)
    if skip:
        names = [n for n in names if not matches_target(n, skip)]
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TargetModulesError(
            f"no nn.Linear in {type(model).__name__} matches targets={targets!r} (skipping {skip}). Linear "
            f"leaf names here: {leaves}; e.g. full names {linears[:4]}")
    return names


# -- tied tensors and meta building ----------------------------------------------------------------------
def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias key: source key}`` for state-dict entries that share storage (tied embeddings)."""
    seen: dict[Any, str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_meta or t.numel() == 0:
            ident: Any = id(t)
        else:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


def retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Make each alias the very same tensor as its source (what ``tie_weights`` does for embeddings)."""
    for alias, source in tied.items():
        a_mod, _, a_name = alias.rpartition(".")
        s_mod, _, s_name = source.rpartition(".")
        setattr(model.get_submodule(a_mod), a_name, getattr(model.get_submodule(s_mod), s_name))


def build_empty(config: PretrainedConfig, cls: type | None = None) -> PreTrainedModel:
    """The model of ``config`` with its parameters on the meta device (buffers such as RoPE's inv_freq
    are real), ready for ``load_state_dict(..., assign=True)``."""
    import transformers
    from accelerate import init_empty_weights

    if cls is None:
        for arch in config.architectures or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                break
    with init_empty_weights():  # parameters only: buffers computed in __init__ must stay real
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(config)
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)


def check_no_meta(model: nn.Module, what: str, error: type[Exception] = CheckpointError) -> None:
    """Raise ``error`` when some parameter or buffer of ``model`` is still on the meta device."""
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise error(f"{what} has no values for {len(left)} tensors, e.g. {left[:5]}; it is incomplete")


# -- swapping layers ------------------------------------------------------------------------------------------
def replace_linear(model: nn.Module, name: str, packed: PackedWeight, quantizer: Quantizer | Preset, *,
                   bias: torch.Tensor | None = None, chunk_rows: int | None = None, preset: str | None = None,
                   plugin_version: str | None = None, source_layout: str = "linear") -> QuantizedLinear:
    """Put a QuantizedLinear over ``packed`` (``[out, in]``) in place of module ``name``; returns it.
    ``source_layout="conv1d"`` when it replaces a GPT-2 ``Conv1D``."""
    if isinstance(quantizer, Preset):
        preset, plugin_version, quantizer = preset or quantizer.name, plugin_version or quantizer.version, \
            quantizer.quantizer
    parent_name, _, leaf = name.rpartition(".")
    layer = QuantizedLinear(packed, quantizer, bias=bias, chunk_rows=chunk_rows, preset=preset,
                            plugin_version=plugin_version, source_layout=source_layout)
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer.to(packed.device))
    return layer


def _swap_in(model: nn.Module, name: str, bq: Preset, chunk_rows: int | None,
             hessian: torch.Tensor | None, lora_init: LoraInit | None = None,
             keep: dict[str, tuple[torch.Tensor, torch.Tensor | None]] | None = None) -> None:
    old = model.get_submodule(name)
    weight = linear_weight(old)  # (out, in); a transposed view for Conv1D and some experts
    if keep is not None:  # a tuning stage will change the packed weight: the residual is refit after it
        keep[name] = (weight.detach(), hessian)
    if lora_init is None:
        packed = bq.quantize(weight.to(torch.float32).contiguous(), hessian)
    else:  # the residual W − W_q needs the dense weight, which is gone after this call
        packed = lora_init.quantize(name, weight.to(torch.float32).contiguous(), hessian, bq.quantize,
                                    lambda p: bq.quantizer.materialize(p, dtype=torch.float32, device=p.device))
    packed.dtype = weight.dtype  # remember the model's dtype (export, dequantize), not the compute one
    replace_linear(model, name, packed, bq, chunk_rows=chunk_rows,
                   bias=None if old.bias is None else old.bias.detach(),
                   source_layout=CONV1D if is_conv1d(old) else "linear")
    del old, weight  # the last reference to the dense weight (unless tied): peak memory stays one layer


@dataclass(frozen=True)
class QuantizeOptions:
    """How ``quantize_model`` picks and calibrates modules (the fields of ``ModuLoRAConfig`` it reads)."""

    targets: Targets = None
    skip: tuple[str, ...] = ()
    calibration: Any = None
    n_samples: int | None = None
    seq_len: int | None = None
    chunk_rows: int | None = None
    lora_init: LoraInit | None = None  # residual LoRA factors, recorded while each dense weight is in hand


def _refitting(tune: T, model: nn.Module, lora_init: LoraInit,
               keep: dict[str, tuple[torch.Tensor, torch.Tensor | None]]) -> T:
    """``tune`` (a block's or the model's tuning stage), then the residual LoRA factors of the layers it
    tuned refit against their tuned weights (their dense weights, in ``keep``, are dropped after)."""
    def run(*args: Any) -> None:
        tune(*args)
        for name, (weight, hessian) in keep.items():
            layer = model.get_submodule(name)
            lora_init.refit(name, weight.to(torch.float32), hessian, layer.dequantize(torch.float32))
        keep.clear()
    return run


def quantize_model(model: PreTrainedModel, preset: str | Any, opts: QuantizeOptions | None = None,
                   *, source: Any = None) -> list[str]:
    """Quantize the targeted linears of ``model`` in place with ``preset`` (a name, config or Preset).

    Calibrates block by block when the quantizer needs it (``opts.calibration``: tokens, text, a dataset, a
    :class:`Calibration`, or ``{name: X^T X}``). ``source`` is where the tokenizer for text calibration comes
    from (default: the model's ``name_or_path``). Returns the quantized module names.
    """
    opts = opts or QuantizeOptions()
    bq = preset if isinstance(preset, Preset) else get_preset(preset)
    if any(True for _ in iter_quantized_layers(model)):
        raise ModuLoRAError("model already has quantized layers; quantize the dense model instead")
    unfuse_experts(model)  # MoE experts: one linear per expert matrix, over views of the fused storage
    cal = resolve_calibration(bq.name, bq.capabilities().needs_calibration, opts.calibration, opts.n_samples,
                              opts.seq_len)
    names = select_targets(model, opts.targets, opts.skip)
    if isinstance(cal, Mapping) and (absent := [n for n in names if n not in cal]):
        raise CalibrationError(f"calibration has no Hessian for {len(absent)} target modules, e.g. "
                               f"{absent[:3]}; give one per module, or calibration data instead")
    tied = tied_aliases(model)
    tied_before = set(tied) | set(tied.values())
    if isinstance(cal, Calibration):  # Hessians from data, one decoder block at a time
        src = source or getattr(model, "name_or_path", None) or None
        tune, tune_model = bq.quantizer.block_tuner(bq.config), bq.quantizer.model_tuner(bq.config)
        keep = {} if (tune or tune_model) is not None and opts.lora_init is not None else None
        if keep is not None and tune_model is not None:  # it changes every layer: refit once, after it
            tune_model = _refitting(tune_model, model, opts.lora_init, keep)
        elif keep is not None:
            tune = _refitting(tune, model, opts.lora_init, keep)
        quantize_blockwise(model, names, calibration_tokens(cal, src),
                           lambda n, h: _swap_in(model, n, bq, opts.chunk_rows, h, opts.lora_init, keep), cal,
                           desc=bq.name, tune=tune, tune_model=tune_model)
    else:
        for name in names:
            _swap_in(model, name, bq, opts.chunk_rows, None if cal is None else cal[name], opts.lora_init)
    if any(f"{n}.weight" in tied_before for n in names) and hasattr(model.config, "tie_word_embeddings"):
        # a quantized lm_head no longer shares the embedding's storage: stop transformers retying them
        model.config.tie_word_embeddings = False
    warn_dense(model, skip=opts.skip)
    return names
