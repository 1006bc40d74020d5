"""ModuLoRA: finetune LLMs whose weights are stored in 2, 3 or 4 bits by any quantizer.

The public face; everything here is re-exported from ``modulora_core``.
"""

from __future__ import annotations

from modulora_core import (
    AdapterError,
    BoundQuantizer,
    CalibrationError,
    Capabilities,
    CheckpointError,
    InvalidWeightError,
    ModuLoRAError,
    PackedWeight,
    PluginError,
    Quantizer,
    QuantizerConfig,
    QuantizerConfigError,
    TargetModulesError,
    UnknownQuantizerError,
    available_quantizers,
    get_quantizer,
    hookimpl,
    list_plugins,
)
from modulora_core.adapters import dequantize, load_adapter, save_adapter
from modulora_core.layers import ModuLoRALinear
from modulora_core.lora_config import LoraConfig
from modulora_core.model import (
    iter_modulora_layers,
    load,
    load_quantized,
    lora_parameters,
    save_quantized,
    set_adapter_enabled,
)
from modulora_core.plan import MemoryPlan, plan

__version__ = "0.1.0"
__all__ = [
    "AdapterError", "BoundQuantizer", "CalibrationError", "Capabilities", "CheckpointError",
    "InvalidWeightError", "LoraConfig", "MemoryPlan", "ModuLoRAError", "ModuLoRALinear", "PackedWeight", "PluginError",
    "Quantizer", "QuantizerConfig", "QuantizerConfigError", "TargetModulesError", "UnknownQuantizerError",
    "available_quantizers", "get_quantizer", "hookimpl", "list_plugins",
    "dequantize", "iter_modulora_layers", "load", "load_adapter", "load_quantized", "lora_parameters",
    "plan", "save_adapter", "save_quantized", "set_adapter_enabled",
]
