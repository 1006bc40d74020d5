"""modulora_plugin_quipsharp: QuIP# (Tseng et al., ICML 2024) in pure torch.

Randomized Hadamard incoherence processing, BlockLDLQ over the E8P 2-bit lattice codebook, and residual
stages for 3 bits (E8P + 1-bit E8) and 4 bits (E8P + E8P). Presets ``quip#-2bit``, ``quip#-3bit``,
``quip#-4bit`` and the same with ``quipsharp`` for shells that dislike ``#``. The layer runs on the fast
path: the activations are transformed, the codes decoded block by block, no dense weight is formed.
"""

from __future__ import annotations

from typing import Any

from modulora_core import hookimpl

from .quantizer import PRESETS, QuipSharpConfig, QuipSharpQuantizer

__all__ = ["PRESETS", "QuipSharpConfig", "QuipSharpQuantizer"]


@hookimpl
def modulora_register_quantizers(register: Any) -> None:
    register(QuipSharpQuantizer(), presets=PRESETS)
