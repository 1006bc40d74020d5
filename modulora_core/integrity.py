"""Integrity of saved quantized models: what ties a checkpoint's config to its weights, and finite weights.

A packed weight decodes correctly only with the settings it was quantized with (bits, group size,
symmetric, ...), and those live in ``config.json``, a file people edit by hand. So a native save records a
*checksum* over the decoding record (preset, quantizer config, per-module packed shapes, format version) and
the quantized modules' tensors: in ``config.json`` (``quantization_config.checksum``) and, with a copy of the
record, in the safetensors header, which nobody edits. Loading recomputes it; on a mismatch the copy in the
header names the edited field. (The modulora 0.1 layout kept a copy of its index in the header too.)
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import CheckpointError, InvalidWeightError
from .files import tensors_digest
from .qlinear import iter_quantized_layers

CHECKSUM_KEY = "modulora_checksum"  # safetensors header: the checksum, as in config.json
RECORD_KEY = "modulora_quantization"  # safetensors header: the decoding record it covers
DECODING_FIELDS = ("preset", "quantizer_config", "modules", "format_version")


def decoding_record(config: dict[str, Any]) -> dict[str, Any]:
    """The part of a ``quantization_config`` (as a dict) that decides how the packed weights decode."""
    return {k: config.get(k) for k in DECODING_FIELDS}


def quantized_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of every quantized module (packed buffers and bias), named as in the saved base."""
    out: dict[str, torch.Tensor] = {}
    for name, layer in iter_quantized_layers(model):
        clean = name.removesuffix(".base_layer")
        for k, t in layer.named_buffers(recurse=False):
            out[f"{clean}.{k}"] = t
        if layer.bias is not None:
            out[f"{clean}.bias"] = layer.bias
    return out


def checksum(record: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """``sha256:<hex>`` over the decoding record (canonical JSON) and the tensors' names, shapes and bytes."""
    h = hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode())
    h.update(tensors_digest(tensors).encode())
    return f"sha256:{h.hexdigest()}"


def header_record(directory: str | os.PathLike) -> dict[str, str]:
    """The ModuLoRA entries of the first safetensors header in ``directory`` (``{}`` when there are none)."""
    from safetensors import safe_open

    for p in sorted(Path(directory).glob("*.safetensors")):
        try:
            with safe_open(str(p), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception:  # noqa: BLE001 - a damaged file is reported by the loader itself
            continue
        if CHECKSUM_KEY in meta:
            return meta
    return {}


def verify_config(config: dict[str, Any], where: str | os.PathLike | None) -> None:
    """Before the weights load: raise :class:`CheckpointError` naming each field of ``config`` (the
    ``quantization_config`` read from ``config.json``) that differs from the record the weights were saved
    with (a hand edit of bits, symmetric, group_size, ...). Checkpoints without a record pass."""
    header = header_record(where) if where and Path(where).is_dir() else {}
    if CHECKSUM_KEY not in header:
        return
    cfg = Path(str(where)) / "config.json"
    if not config.get("checksum"):
        raise CheckpointError(f"{cfg}: quantization_config has no checksum, but the weights were saved with one "
                              f"(edited by hand?); restore config.json from the save, or save the model again")
    edits = list(record_differences(json.loads(header[RECORD_KEY]), decoding_record(config)))
    if edits:
        raise CheckpointError(f"{cfg} was edited after the model was saved: {'; '.join(edits[:3])}. The packed "
                              f"weights decode only with the settings they were saved with: restore those "
                              f"values, or quantize the dense model again with the settings you want")


def verify_tensors(model: nn.Module, config: dict[str, Any], where: str | os.PathLike | None) -> None:
    """After the weights load: raise :class:`CheckpointError` unless ``model``'s quantized tensors and
    ``config`` match the checksum recorded at save (a checkpoint saved before checksums passes)."""
    recorded = config.get("checksum")
    if recorded and checksum(decoding_record(config), quantized_tensors(model)) != recorded:
        raise CheckpointError(f"{where}: the quantized weights do not match the checksum recorded in config.json "
                              f"(a *.safetensors file is corrupted or from another save); save the model again")


def record_differences(saved: Any, now: Any, path: str = "quantization_config",
                       file: str = "config.json") -> Iterator[str]:
    """``"<field> is X in <file> but the weights were saved with Y"`` for each leaf that differs."""
    if isinstance(saved, dict) and isinstance(now, dict):
        for k in sorted(set(saved) | set(now), key=str):
            yield from record_differences(saved.get(k), now.get(k), f"{path}.{k}", file)
    elif saved != now:
        yield f"{path} is {json.dumps(now)} in {file} but the weights were saved with {json.dumps(saved)}"


def check_legacy_index(index: dict[str, Any], header: dict[str, str], where: str | os.PathLike) -> None:
    """A modulora 0.1 index must match the copy its weights file keeps in the header (``modulora_index``):
    its SHA-256 covered the tensors only, so an edited bits or symmetric would decode them differently."""
    if "modulora_index" not in header:
        return
    saved = json.loads(header["modulora_index"]).get("modules")
    edits = list(record_differences(saved, index.get("modules"), "modules", Path(where).name))
    if edits:
        raise CheckpointError(f"{where} was edited after the model was saved: {'; '.join(edits[:3])}. The packed "
                              f"weights decode only with the settings they were saved with: restore those "
                              f"values, or quantize the dense model again with the settings you want")


def nonfinite(named: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, int]]:
    """``(name, count)`` of the floating tensors in ``named`` that hold NaN or inf values."""
    bad = []
    for name, t in named:
        if t.is_floating_point() and t.device.type != "meta":
            n = int((~torch.isfinite(t.detach())).sum())
            if n:
                bad.append((name, n))
    return bad


def check_finite(model: nn.Module, what: str = "the model") -> None:
    """Raise :class:`InvalidWeightError` naming every parameter or buffer of ``model`` with NaN/inf values:
    one damaged tensor (a norm, an embedding) would otherwise make every loss NaN."""
    bad = nonfinite([*model.named_parameters(), *model.named_buffers()])
    if bad:
        listed = ", ".join(f"{n} ({c} NaN/inf)" for n, c in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise InvalidWeightError(f"{what} has non-finite weights: {listed}; the checkpoint is damaged. Use an "
                                 f"undamaged copy of the model (download or save it again)")
