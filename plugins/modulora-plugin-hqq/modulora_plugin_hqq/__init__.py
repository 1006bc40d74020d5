"""modulora-plugin-hqq: Half-Quadratic Quantization (the hqq library) as a ModuLoRA quantizer.

A third-party wrapper: hqq quantizes and dequantizes, this package adapts its storage to ModuLoRA's
PackedWeight. hqq itself is imported on first use, so listing plugins stays fast.
"""

from __future__ import annotations

import importlib.util

from modulora_core import PluginError, hookimpl

from .config import HQQConfig
from .quantizer import HQQQuantizer

__all__ = ["HQQConfig", "HQQQuantizer"]


@hookimpl
def modulora_register_quantizers(register):
    # without hqq, register nothing: `modulora plugins` shows this error instead of presets that cannot run
    if importlib.util.find_spec("hqq") is None:
        raise PluginError("modulora-plugin-hqq needs the hqq library; install it: pip install 'hqq>=0.2'")
    register(
        HQQQuantizer(),
        presets={
            "hqq-1bit": HQQConfig(bits=1),
            "hqq-2bit": HQQConfig(bits=2),
            "hqq-3bit": HQQConfig(bits=3),
            "hqq-4bit": HQQConfig(bits=4),
            "hqq-8bit": HQQConfig(bits=8),
        },
    )
