"""modulora-plugin-rtn: round-to-nearest INT-k, the smallest complete ModuLoRA quantizer plugin.

The whole contract with ModuLoRA is this hook plus the ``modulora`` entry point in ``pyproject.toml``.
"""

from __future__ import annotations

from modulora_core import hookimpl

from .quantizer import RTNConfig, RTNQuantizer

__all__ = ["RTNConfig", "RTNQuantizer"]


@hookimpl
def modulora_register_quantizers(register):
    register(
        RTNQuantizer(),
        presets={
            "rtn-2bit": RTNConfig(bits=2),
            "rtn-3bit": RTNConfig(bits=3),
            "rtn-4bit": RTNConfig(bits=4),
            "rtn-8bit": RTNConfig(bits=8),
        },
    )
