"""Our checkpoint formats: the Hugging Face-native one (``save_pretrained`` with a ``modulora``
quantization_config) and, read-only, the layout of modulora 0.1 (``modulora_quant.json`` +
``modulora_model.safetensors``), converted on load through the shared builder.

``save_quantized`` writes the native format atomically (staged, then renamed), so a failed save leaves an
earlier checkpoint in the directory intact; ``from_pretrained(dir)`` reloads it after ``import modulora``.
``build_quantized_model`` is the one "packed tensors -> model" builder that every loader calls: the legacy
layout here, GPTQ checkpoints in the OPTQ plugin.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .errors import CheckpointError, ModuLoRAError, UnknownQuantizerError
from .experts import unfuse_experts
from .files import read_json, read_safetensors, staged_writes, tensors_digest
from .hf import METHOD, ModuLoRAConfig, _check_versions, mark_quantized
from .integrity import check_legacy_index
from .layouts import CONV1D, is_conv1d, is_quantizable, out_in
from .qlinear import PACKED_PREFIX, iter_quantized_layers
from .quantizer import PackedWeight
from .registry import Preset, get_family, get_preset
from .surgery import build_empty, check_no_meta, replace_linear, retie

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

LEGACY_INDEX = "modulora_quant.json"
LEGACY_WEIGHTS = "modulora_model.safetensors"
CONFIG_FILE = "config.json"


def checkpoint_kind(path: Any) -> str | None:
    """``"native"`` for a ``save_pretrained`` directory of a ModuLoRA model, ``"legacy"`` for the 0.1
    layout, else None."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return None
    d = Path(path)
    if (d / LEGACY_INDEX).is_file():
        return "legacy"
    try:
        qc = json.loads((d / CONFIG_FILE).read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return "native" if isinstance(qc, dict) and qc.get("quant_method") == METHOD else None


def save_quantized(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None,
                   format: str = "modulora") -> Path:
    """Write the quantized base (no adapters) so ``from_pretrained(directory)`` reloads it packed.

    ``model``: a quantized model or a PeftModel over one (its adapters and merged state are left out: save
    adapters with ``save_pretrained`` on the PeftModel; merge first with ``merge_requantized`` to keep them). ``format="gptq"`` (or any format the layers' plugin offers) writes
    that tool's checkpoint instead.
    """
    from .export import export_checkpoint

    base = unwrap_peft(model)
    layers = {n.removesuffix(".base_layer"): m for n, m in iter_quantized_layers(base)}
    if not layers:
        raise CheckpointError("model has no quantized layers; quantize it first (modulora.load(model, preset))")
    if format != "modulora":
        return export_checkpoint(base, layers, directory, format, tokenizer=tokenizer)
    if (merged := [n for n, m in base.named_modules() if getattr(m, "merged_adapters", None)]):
        raise CheckpointError(f"{len(merged)} layers have merged adapters (e.g. {merged[0]}), so their base is "
                              f"dense now; unmerge_adapter() first, or merge_requantized(model) to save it merged")
    with staged_writes(directory, last=(CONFIG_FILE,)) as stage:
        base.save_pretrained(stage)  # ModuLoRAHfQuantizer.get_state_dict_and_metadata drops the adapters
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return Path(directory)


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The transformers model under a PeftModel (or ``model`` itself)."""
    inner = getattr(getattr(model, "base_model", None), "model", None)
    return inner if inner is not None and hasattr(model, "peft_config") else model


def load_legacy(directory: str | os.PathLike, *, chunk_rows: int | None = None, verify: bool = True,
                **_: Any) -> PreTrainedModel:
    """Read a modulora 0.1 ``save_quantized`` directory: model on meta, QuantizedLinear over the packed
    tensors, nothing re-quantized. Warns once: save it again with ``save_pretrained`` to convert it."""
    from transformers import AutoConfig, GenerationConfig

    d = Path(directory)
    missing = [f for f in (LEGACY_INDEX, LEGACY_WEIGHTS, CONFIG_FILE) if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d} lacks {missing}; a modulora 0.1 checkpoint holds {LEGACY_INDEX}, "
                              f"{LEGACY_WEIGHTS} and {CONFIG_FILE}")
    index = read_json(d / LEGACY_INDEX, CheckpointError)
    entries = index.get("modules") if isinstance(index, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{d / LEGACY_INDEX} lists no quantized modules; it is not a modulora index")
    if index.get("layout_version", 1) > 1:
        raise CheckpointError(f"{d} uses checkpoint layout {index['layout_version']}; upgrade modulora")
    tensors, meta = read_safetensors(d / LEGACY_WEIGHTS, CheckpointError)
    if meta.get("modulora_checkpoint_id") != index.get("checkpoint_id"):
        raise CheckpointError(f"{d / LEGACY_WEIGHTS} and {d / LEGACY_INDEX} come from different saves "
                              f"(an interrupted save?); save the model again")
    if verify and index.get("sha256") and tensors_digest(tensors) != index["sha256"]:
        raise CheckpointError(f"{d / LEGACY_WEIGHTS}: tensor data does not match the SHA-256 recorded in "
                              f"{LEGACY_INDEX}; the file is corrupted, save it again")
    modules: dict[str, PackedModule] = {}
    for name, e in entries.items():
        try:
            fam = get_family(e["family"])
        except UnknownQuantizerError as err:
            raise CheckpointError(f"{d} was quantized with family {e['family']!r} by {e.get('plugin')} "
                                  f"{e.get('plugin_version')}, which is not installed: pip install "
                                  f"{e.get('plugin')} ({err})") from None
        _check_versions(fam, ModuLoRAConfig(quantizer_config={"family": e["family"]}, plugin=e.get("plugin"),
                                            plugin_version=e.get("plugin_version"),
                                            format_version=int(e["format_version"])))
        try:
            packed_t = {k: tensors.pop(f"{name}.{PACKED_PREFIX}{k}") for k in e["tensors"]}
            bias = tensors.pop(f"{name}.bias") if e["has_bias"] else None
            packed = fam.quantizer.unpack(packed_t, e)
        except KeyError as err:
            raise CheckpointError(f"{d}: module {name} is in the index but {err} is missing from "
                                  f"{LEGACY_WEIGHTS}") from None
        except (ModuLoRAError, ValueError) as err:
            raise CheckpointError(f"{d}: plugin {fam.plugin} cannot unpack module {name}: {err}") from err
        bq = get_preset(packed.config)
        bq = type(bq)(e.get("quantizer") or bq.name, bq.quantizer, bq.config, bq.plugin, bq.version)
        modules[name] = PackedModule(packed, bq, bias)
    if verify:
        check_legacy_index(index, meta, d / LEGACY_INDEX)
    cr = chunk_rows if chunk_rows is not None else index.get("chunk_rows")
    model = build_quantized_model(AutoConfig.from_pretrained(d), modules, tensors, tied=index.get("tied", {}),
                                  chunk_rows=cr, where=str(d / LEGACY_WEIGHTS))
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d)
    warnings.warn(f"{d} is in the modulora 0.1 layout; it loaded, and save_quantized(model, dir) or "
                  f"model.save_pretrained(dir) writes it in the current format that from_pretrained reads",
                  stacklevel=2)
    return model


# -- the one builder ------------------------------------------------------------------------------------------
@dataclass
class PackedModule:
    """One quantized module for :func:`build_quantized_model`: its packed weight, plugin and bias."""

    packed: PackedWeight
    quantizer: Preset
    bias: torch.Tensor | None = None


def build_quantized_model(config: PretrainedConfig, modules: Mapping[str, PackedModule],
                          tensors: dict[str, torch.Tensor], *, tied: Mapping[str, str] | None = None,
                          chunk_rows: int | None = None, cls: type | None = None, where: str = "checkpoint",
                          qconfig: ModuLoRAConfig | None = None) -> PreTrainedModel:
    """A model of ``config`` whose ``modules`` are QuantizedLinear over the given packed weights and whose
    other parameters come from ``tensors`` (assigned, not copied). Nothing is re-quantized. Returns the
    model frozen, in eval mode, marked quantized (``model.config.quantization_config``)."""
    model = build_empty(config, cls)
    unfuse_experts(model)  # as quantize_model did: one module per expert matrix
    for name, pm in modules.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{where}: module {name} is not in the {type(model).__name__} built from its "
                                  f"config") from None
        if not is_quantizable(old) or out_in(old) != tuple(pm.packed.shape):
            raise CheckpointError(f"{where}: module {name} is {old} in the model built from its config, not "
                                  f"a linear of shape {list(pm.packed.shape)}")
        replace_linear(model, name, pm.packed, pm.quantizer, bias=pm.bias, chunk_rows=chunk_rows,
                       source_layout=CONV1D if is_conv1d(old) else "linear")
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{where} has tensors the model lacks: {result.unexpected_keys[:5]}")
    retie(model, tied or {})
    check_no_meta(model, where)
    model.eval()  # as from_pretrained returns it
    first = next(iter(modules.values())).quantizer
    mark_quantized(model, qconfig or ModuLoRAConfig.from_preset(first, chunk_rows=chunk_rows))
    return model
