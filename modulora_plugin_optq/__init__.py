"""modulora_plugin_optq: OPTQ / GPTQ 2/3/4/8-bit with groups and act-order, stored as GPTQ v1 checkpoints.

Presets: ``optq-2bit``, ``optq-3bit``, ``optq-4bit``, ``optq-8bit`` (symmetric, group 128, act-order off;
other settings through :class:`OPTQConfig`). OPTQ needs calibration: ``modulora.load(model, "optq-4bit",
calibration=...)`` runs the core's block-by-block pipeline. A GPTQ checkpoint directory written by
GPTQModel, AutoGPTQ or transformers is claimed through ``modulora_detect_format``, so ``modulora.load(path)``
attaches LoRA to it without re-quantizing; ``modulora.save_quantized(model, d, format="gptq")`` writes one.
"""

from __future__ import annotations

from typing import Any

from modulora_core import hookimpl

from .config import PRESETS, OPTQConfig, preset_name
from .quantizer import OPTQQuantizer

__all__ = ["PRESETS", "OPTQConfig", "OPTQQuantizer", "preset_name"]


@hookimpl
def modulora_register_quantizers(register: Any) -> None:
    register(OPTQQuantizer(), presets=PRESETS)


@hookimpl
def modulora_detect_format(model_or_path: Any) -> Any:
    from .gptq_format import is_gptq_checkpoint, load_gptq  # lazy: only a path to look at needs it

    return load_gptq if is_gptq_checkpoint(model_or_path) else None
