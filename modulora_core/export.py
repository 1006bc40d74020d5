"""Other tools' checkpoint formats (``save_quantized(..., format="gptq")``), written by the plugins that offer them.

A quantizer offers formats by listing them in a class attribute ``export_formats`` and implementing
``export_checkpoint(model, directory, *, format, tokenizer=None) -> path``; the core only dispatches.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from .errors import CheckpointError
from .qlinear import QuantizedLinear


def export_checkpoint(model: nn.Module, layers: Mapping[str, QuantizedLinear], directory: str | os.PathLike,
                      format: str, *, tokenizer: Any = None) -> Path:
    """Write ``model`` (whose quantized ``layers`` all share one quantizer family) as a ``format`` checkpoint."""
    from .fsdp import refuse_if_sharded

    refuse_if_sharded(model)
    quantizers = {type(m.quantizer): m.quantizer for m in layers.values()}
    q = next(iter(quantizers.values()))
    offered = tuple(getattr(q, "export_formats", ()))
    if len(quantizers) > 1 or format not in offered:
        fams = sorted({m.quantizer.name for m in layers.values()})
        raise CheckpointError(f"cannot save in format {format!r}: this model's layers are quantized with {fams}, "
                              f"whose plugin writes {list(offered) or 'no other format'}; use format='modulora'")
    return Path(q.export_checkpoint(model, directory, format=format, tokenizer=tokenizer))
