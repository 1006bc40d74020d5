"""ModuLoRA: finetune LLMs whose weights are stored in 2, 3 or 4 bits by any quantizer.

The public face. The engine (quantized layer, transformers quantizer, plugins' protocol) comes from
``modulora_core``; adapters come from PEFT. Importing ``modulora`` registers quantization method
``"modulora"`` with transformers, so ``from_pretrained(dir)`` reloads a saved ModuLoRA model.
"""

from __future__ import annotations

from modulora_core import (
    AdapterError,
    CalibrationError,
    Capabilities,
    CheckpointError,
    InvalidWeightError,
    ModuLoRAConfig,
    ModuLoRAError,
    PackedWeight,
    PluginError,
    Preset,
    QuantizedLinear,
    Quantizer,
    QuantizerConfig,
    QuantizerConfigError,
    TargetModulesError,
    UnknownQuantizerError,
    available_presets,
    get_preset,
    hookimpl,
    iter_quantized_layers,
    list_plugins,
)
from modulora_core.checkpoint import save_quantized
from modulora_core.lora_init import LoraInit, apply_lora_init, init_lora_from_residual
from modulora_core.merge import dequantize, merge_requantized

from .adapters import load_adapter, save_adapter
from .api import default_lora, load, lora_parameters
from .planning import MemoryPlan, plan

__version__ = "0.2.0"
__all__ = [
    "AdapterError", "Preset", "CalibrationError", "Capabilities", "CheckpointError",
    "InvalidWeightError", "LoraInit", "MemoryPlan", "ModuLoRAConfig", "ModuLoRAError", "PackedWeight", "PluginError",
    "QuantizedLinear", "Quantizer", "QuantizerConfig", "QuantizerConfigError", "TargetModulesError",
    "UnknownQuantizerError", "apply_lora_init", "available_presets", "default_lora", "dequantize", "get_preset", "hookimpl",
    "init_lora_from_residual", "iter_quantized_layers", "list_plugins", "load", "load_adapter", "lora_parameters", "merge_requantized",
    "plan", "save_adapter", "save_quantized",
]
