"""PEFT's own LoRA layer over a QuantizedLinear: LoRA, DoRA, rsLoRA, several adapters, merge/unmerge.

PEFT picks the LoRA layer for a target module through a list of dispatchers; a QuantizedLinear is an
``nn.Linear``, so PEFT's default would wrap it in its dense ``lora.Linear``, whose forward is right but
whose merge edits ``base_layer.weight.data`` in place (a no-op on a weight materialized per read), and
whose DoRA-with-dropout path multiplies by a dense W that autograd would keep alive until backward. So
:func:`register_with_peft` puts one dispatcher first, for QuantizedLinear only; PEFT's
``LoraConfig._register_custom_module`` would do the same but only for configs a user remembered to
register, and users pass stock ``LoraConfig`` objects.

:class:`QuantizedLoraLinear` *is* PEFT's ``lora.Linear`` (every adapter feature comes from there) with
three changes: device/dtype come from the packed buffers, DoRA's base output is always the
re-materializing one, and merging swaps the packed base for a dense ``nn.Linear`` (W + ΔW); unmerging
the last adapter puts the untouched packed base back, so unmerge is exact.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from peft.tuners.lora import LoraModel
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.lora.variants import DoraLinearVariant
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .qlinear import QuantizedLinear

_REGISTERED = False


class QuantizedDoraVariant(DoraLinearVariant):
    """DoRA whose base term comes from the quantized layer itself, also when dropout is on: PEFT's own
    path would compute ``F.linear(dropout(x), W)`` with the dense W and autograd would keep W."""

    @staticmethod
    def forward(module: PeftLoraLinear, active_adapter: str, x: torch.Tensor, result: torch.Tensor,
                **kwargs: Any) -> torch.Tensor:
        dropout = module.lora_dropout[active_adapter]
        if isinstance(dropout, nn.Identity) or not module.training:
            base_result = result
        else:
            x = dropout(x)
            base_result = module.get_base_layer()(x)  # (..., out), re-materialized, bias removed below
        return result + module.lora_magnitude_vector[active_adapter](
            x, lora_A=module.lora_A[active_adapter], lora_B=module.lora_B[active_adapter],
            scaling=module.scaling[active_adapter], base_layer=module.get_base_layer(),
            base_result=base_result, adapter_name=active_adapter)


class QuantizedLoraLinear(PeftLoraLinear):
    """PEFT's ``lora.Linear`` over a :class:`QuantizedLinear` base."""

    def _get_in_out_features(self, module: nn.Module) -> tuple[Any, Any]:
        if isinstance(module, QuantizedLinear):  # PEFT's own reads module.weight (a materialization)
            return module.in_features, module.out_features
        return super()._get_in_out_features(module)

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[Any, Any]:
        if isinstance(base_layer, QuantizedLinear):  # without materializing the weight
            return base_layer.device, base_layer.dtype
        return super()._get_base_layer_device_and_dtype(base_layer)

    def resolve_lora_variant(self, *, config: Any, **kwargs: Any) -> Any:
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if type(variant) is DoraLinearVariant or variant is DoraLinearVariant:
            return QuantizedDoraVariant()
        return variant

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Merge into a dense copy of the base (PEFT's own merge then runs on it); the packed base is kept
        aside for :meth:`unmerge`. ``modulora.merge_requantized`` keeps the merged layer packed instead."""
        base = self.get_base_layer()
        if isinstance(base, QuantizedLinear) and self._will_merge(adapter_names):
            self._packed_base = base
            self.base_layer = base.to_dense()
        super().merge(safe_merge=safe_merge, adapter_names=adapter_names)

    def unmerge(self) -> None:
        """Undo :meth:`merge`; once no adapter is merged, the original packed base is back (exactly)."""
        super().unmerge()
        packed = getattr(self, "_packed_base", None)
        if packed is not None and not self.merged_adapters:
            self.base_layer = packed
            del self._packed_base

    def _will_merge(self, adapter_names: list[str] | None) -> bool:
        names = self.active_adapters if adapter_names is None else adapter_names
        return any(n in self.lora_A for n in names)


def _dispatch_quantized(target: nn.Module, adapter_name: str, config: Any = None,
                        **kwargs: Any) -> nn.Module | None:
    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if isinstance(base, QuantizedLinear) and kwargs.get("parameter_name") is None:
        kwargs.pop("parameter_name", None)
        if getattr(config, "fan_in_fan_out", False):
            config.fan_in_fan_out = False  # a QuantizedLinear is [out, in], as nn.Linear
        return QuantizedLoraLinear(target, adapter_name, config=config, **kwargs)
    return None


def experts_targets(peft_config: Any, model: nn.Module) -> None:
    """Adapt ``peft_config`` in place to a model whose MoE experts are unfused (one linear per expert).

    PEFT reaches fused experts through ``target_parameters`` (``"mlp.experts.gate_up_proj"``); here those
    become the per-expert modules (``mlp.experts.<e>.gate_up_proj``), which get PEFT's usual LoRA layer.
    """
    from .experts import expert_parameter_modules

    wanted = list(getattr(peft_config, "target_parameters", None) or [])
    if not wanted:
        return
    kept, modules = [], set()
    for t in wanted:
        hits = expert_parameter_modules(model, t)
        modules.update(hits)
        if not hits:
            kept.append(t)
    if modules:
        peft_config.target_modules = sorted({*_as_set(peft_config.target_modules), *modules})
    peft_config.target_parameters = kept or None


def _as_set(target_modules: Any) -> set[str]:
    if target_modules is None:
        return set()
    if isinstance(target_modules, str):
        raise ValueError(f"target_modules={target_modules!r} is a regex; with target_parameters on MoE experts, "
                         f"give target_modules as a list of names")
    return set(target_modules)


def _patch_moe_config_conversion() -> None:
    """PEFT rewrites the targets and adapter keys of some MoE models for transformers 5's fused experts
    (``down_proj`` moves to ``target_parameters``, ``experts.<e>.down_proj`` keys get fused). A ModuLoRA
    model's experts are unfused modules, so the rewrite would drop them: skip it there, and map
    ``target_parameters`` on experts to the per-expert modules instead."""
    try:
        from peft.utils import transformers_weight_conversion as conv
    except ImportError:  # an older PEFT: no rewrite to undo
        return
    original = conv.convert_peft_config_for_transformers

    @functools.wraps(original)
    def convert(peft_config: Any, model: nn.Module, conversions: Any = None) -> None:
        from .experts import has_unfused_experts

        if has_unfused_experts(model):
            experts_targets(peft_config, model)
            return None
        return original(peft_config, model=model, conversions=conversions)

    conv.convert_peft_config_for_transformers = convert
    original_sd = getattr(conv, "convert_peft_adapter_state_dict_for_transformers", None)
    if original_sd is None:
        return

    @functools.wraps(original_sd)
    def convert_state_dict(model: nn.Module, peft_config: Any, adapter_state_dict: dict[str, Any],
                           adapter_name: str = "default") -> dict[str, Any]:
        from .experts import has_unfused_experts

        # per-expert adapter keys (experts.<e>.down_proj.lora_A) would be taken for transformers 4 keys
        if has_unfused_experts(model):
            return adapter_state_dict
        return original_sd(model=model, peft_config=peft_config, adapter_state_dict=adapter_state_dict,
                           adapter_name=adapter_name)

    conv.convert_peft_adapter_state_dict_for_transformers = convert_state_dict


def register_with_peft() -> None:
    """Make PEFT build :class:`QuantizedLoraLinear` for every QuantizedLinear target (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    _patch_moe_config_conversion()
    original = LoraModel._create_new_module

    @functools.wraps(original)
    def create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        new = _dispatch_quantized(target, adapter_name, config=lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(create_new_module)
    _REGISTERED = True
