"""Merging adapters into the base: dense (PEFT's own ``merge_and_unload``) or back into packed form.

``merge_requantized`` re-quantizes ``W + ΔW`` of every adapted layer with the layer's own quantizer, one
layer at a time; quantizers that calibrate get fresh Hessians, block by block, from the merged model's own
activations (the blocks before the current one already merged and re-quantized, as when quantizing).
``dequantize`` gives a dense copy of any ModuLoRA model, merged or not.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .calibrate import quantize_blockwise
from .calibration_data import Calibration, calibration_tokens, resolve_calibration
from .checkpoint import unwrap_peft
from .errors import AdapterError, CalibrationError
from .hf import ModuLoRAConfig, mark_quantized
from .layouts import restore_layouts
from .peft_lora import QuantizedLoraLinear
from .qlinear import QuantizedLinear, iter_quantized_layers


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def merge_requantized(model: nn.Module, *, calibration: Any = None, n_samples: int | None = None,
                      seq_len: int | None = None, adapter_names: list[str] | None = None) -> nn.Module:
    """Merge the active adapters of a PeftModel over a ModuLoRA base and re-quantize each merged layer.

    Returns the transformers model, packed throughout, without adapter layers. ``calibration`` (as in
    ``modulora.load``) is required when the quantizer calibrates (OPTQ, QuIP#).
    """
    from .fsdp import refuse_if_sharded

    refuse_if_sharded(model)
    base = unwrap_peft(model)
    layers = {n: m for n, m in base.named_modules() if isinstance(m, QuantizedLoraLinear)
              and isinstance(m.get_base_layer(), QuantizedLinear)}
    if not layers:
        raise AdapterError("no LoRA layer over a quantized base to merge; pass the PeftModel that "
                           "modulora.load or peft.get_peft_model returned")
    presets = {m.get_base_layer().preset for m in layers.values()}
    bq = next(iter(layers.values())).get_base_layer()
    from .registry import get_preset

    bound = get_preset(bq.packed.config)
    cal = resolve_calibration(bound.name, bound.capabilities().needs_calibration, calibration, n_samples,
                              seq_len)
    if len(presets) > 1:
        raise AdapterError(f"adapted layers use several presets {sorted(presets)}; merge them one by one")

    def requantize(name: str, hessian: torch.Tensor | None) -> None:
        lora = base.get_submodule(name)
        old: QuantizedLinear = lora.get_base_layer()
        lora.merge(adapter_names=adapter_names)
        dense = lora.get_base_layer()  # nn.Linear with W + ΔW
        packed = bound.quantize(dense.weight.detach().to(torch.float32), hessian)
        packed.dtype = old.dtype
        bias = None if dense.bias is None else dense.bias.detach()
        _set(base, name, QuantizedLinear(packed, bound.quantizer, bias=bias, chunk_rows=old.chunk_rows,
                                         preset=old.preset, plugin_version=old.plugin_version,
                                         source_layout=old.source_layout).to(old.device))
        del lora, dense

    if isinstance(cal, Calibration):
        quantize_blockwise(base, list(layers), calibration_tokens(cal, getattr(base, "name_or_path", None)),
                           requantize, cal, desc=f"merging into {bound.name}")
    elif isinstance(cal, Mapping):
        if absent := [n for n in layers if n not in cal]:
            raise CalibrationError(f"no Hessian for {absent[:3]}; give one per adapted module")
        for n in layers:
            requantize(n, cal[n])
    else:
        for n in layers:
            requantize(n, None)
    qc = getattr(base.config, "quantization_config", None)
    return mark_quantized(base, qc if isinstance(qc, ModuLoRAConfig) else ModuLoRAConfig(bound))


def dequantize(model: nn.Module, *, merge: bool = False) -> nn.Module:
    """A dense copy (shares no tensor with ``model``): every QuantizedLinear becomes an ``nn.Linear`` with
    the materialized weight, in the dtype it was quantized from; with ``merge`` the active adapters are
    merged, else dropped. The copy saves and loads with plain ``save_pretrained``/``from_pretrained``."""
    from .fsdp import refuse_if_sharded

    refuse_if_sharded(model)
    dense = copy.deepcopy(model)
    if hasattr(dense, "peft_config"):
        dense = dense.merge_and_unload() if merge else dense.unload()
    for name, layer in list(iter_quantized_layers(dense)):
        _set(dense, name, layer.to_dense(layer.dtype))
    restore_layouts(dense)  # Conv1D weights transposed back, MoE experts fused back
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(dense, attr):
            delattr(dense, attr)
    dense.is_quantized = False
    if hasattr(getattr(dense, "config", None), "quantization_config"):
        del dense.config.quantization_config
    return dense
