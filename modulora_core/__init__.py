"""modulora_core: the engine of ModuLoRA. Plugins import only the names re-exported here."""

from __future__ import annotations

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
from .hookspecs import hookimpl
from .layers import ModuLoRALinear
from .lora_config import LoraConfig
from .model import ModuLoRAInfo, finalize_model, matches_target, replace_linear
from .quantizer import Capabilities, PackedWeight, Quantizer, QuantizerConfig
from .registry import BoundQuantizer, available_quantizers, get_quantizer, list_plugins

__all__ = [
    "AdapterError", "BoundQuantizer", "CalibrationError", "Capabilities", "CheckpointError",
    "InvalidWeightError", "ModuLoRAError", "PackedWeight", "PluginError", "Quantizer", "QuantizerConfig",
    "QuantizerConfigError", "TargetModulesError", "UnknownQuantizerError", "available_quantizers",
    "get_quantizer", "hookimpl", "list_plugins",
    # for plugins that take over models quantized elsewhere
    "LoraConfig", "ModuLoRAInfo", "ModuLoRALinear", "finalize_model", "matches_target", "replace_linear",
]
