"""The core's own checkpoint format (``modulora.save_quantized``), claimed through the detect hook."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .hookspecs import hookimpl

QUANT_INDEX = "modulora_quant.json"
WEIGHTS_FILE = "modulora_model.safetensors"


def is_modulora_checkpoint(path: Any) -> bool:
    """True when ``path`` is a directory written by ``modulora.save_quantized``."""
    return isinstance(path, (str, os.PathLike)) and (Path(path) / QUANT_INDEX).is_file()


@hookimpl
def modulora_detect_format(model_or_path: Any) -> Any:
    if is_modulora_checkpoint(model_or_path):
        from .model import load_quantized  # lazy: model.py imports transformers

        return load_quantized
    return None
