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


def register_with_peft() -> None:
    """Make PEFT build :class:`QuantizedLoraLinear` for every QuantizedLinear target (idempotent)."""
    global _REGISTERED
    if _REGISTERED:
        return
    original = LoraModel._create_new_module

    @functools.wraps(original)
    def create_new_module(lora_config: Any, adapter_name: str, target: nn.Module, **kwargs: Any) -> nn.Module:
        new = _dispatch_quantized(target, adapter_name, config=lora_config, **kwargs)
        return new if new is not None else original(lora_config, adapter_name, target, **kwargs)

    LoraModel._create_new_module = staticmethod(create_new_module)
    _REGISTERED = True
