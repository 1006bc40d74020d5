"""modulora_core: the engine of ModuLoRA. Plugins import only the names re-exported here.

Importing it registers quantization method ``"modulora"`` with transformers (so ``from_pretrained`` reads
ModuLoRA checkpoints) and ModuLoRA's LoRA layer with PEFT (so ``get_peft_model`` wraps QuantizedLinear).
"""

from __future__ import annotations

from .checkpoint import PackedModule, build_quantized_model
from .errors import (
    AdapterError,
    CalibrationError,
    CheckpointError,
    InvalidWeightError,
    ModuLoRAError,
    PluginError,
    QuantizerConfigError,
    TargetModulesError,
    UnknownQuantizerError,
)
from .hf import ModuLoRAConfig, ModuLoRAHfQuantizer, mark_quantized
from .hf import register as _register_with_transformers
from .hookspecs import hookimpl
from .kernels import SMALL_BATCH, kernel
from .peft_lora import QuantizedLoraLinear, register_with_peft
from .qlinear import QuantizedLinear, iter_quantized_layers
from .quantizer import BlockTune, Capabilities, ModelTune, PackedWeight, Quantizer, QuantizerConfig
from .registry import Preset, available_presets, get_preset, list_plugins
from .surgery import (
    QuantizeOptions,
    matches_target,
    quantize_model,
    replace_linear,
)

_register_with_transformers()
register_with_peft()

__all__ = [
    "AdapterError", "BlockTune", "ModelTune", "Preset", "CalibrationError", "Capabilities", "CheckpointError",
    "InvalidWeightError", "ModuLoRAError", "PackedWeight", "PluginError", "Quantizer", "QuantizerConfig",
    "QuantizerConfigError", "TargetModulesError", "UnknownQuantizerError", "available_presets",
    "get_preset", "hookimpl", "list_plugins",
    # compiled kernels with an eager fallback, for materialize and decode paths
    "SMALL_BATCH", "kernel",
    # the quantized base and transformers' side of it
    "ModuLoRAConfig", "ModuLoRAHfQuantizer", "QuantizedLinear", "QuantizedLoraLinear", "iter_quantized_layers", "mark_quantized",
    # model surgery, for plugins that convert models quantized elsewhere
    "PackedModule", "QuantizeOptions", "build_quantized_model", "matches_target", "quantize_model",
    "replace_linear",
]
