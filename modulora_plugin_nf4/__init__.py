"""modulora_plugin_nf4: QLoRA's NormalFloat-4 (and bitsandbytes' FP4), with double quantization, pure torch.

Presets: ``nf4`` (double quantization, the QLoRA default), ``nf4-nodq``, ``fp4``, ``fp4-nodq``. The storage
is bitsandbytes' own, so a model that transformers loaded with ``BitsAndBytesConfig(load_in_4bit=True)``
is taken over by ``modulora.load(model)`` without re-quantizing (the ``modulora_detect_format`` hook).
"""

from __future__ import annotations

from typing import Any

from modulora_core import hookimpl

from .quantizer import PRESETS, NF4Config, NF4Quantizer

__all__ = ["PRESETS", "NF4Config", "NF4Quantizer"]


@hookimpl
def modulora_register_quantizers(register: Any) -> None:
    register(NF4Quantizer(), presets=PRESETS)


@hookimpl
def modulora_detect_format(model_or_path: Any) -> Any:
    from .bnb_format import claims, take_over  # lazy: only a model or path to look at needs it

    return take_over if claims(model_or_path) else None
