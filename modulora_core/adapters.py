"""LoRA adapters in the PEFT format (stock ``peft.PeftModel.from_pretrained`` loads them), and export.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` exactly as PEFT writes
them, plus ``modulora_config.json`` (PEFT drops unknown keys from its own config, so ours live apart): the
quantizer the adapter was trained on and a fingerprint of the base model.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch as st
import torch
from torch import nn

from .errors import AdapterError
from .files import read_json, read_safetensors, staged_writes, write_json
from .layers import ModuLoRALinear
from .model import (
    ModuLoRAInfo,
    build_empty,
    check_no_meta,
    iter_modulora_layers,
    matches_target,
    modulora_version,
    retie,
    tied_aliases,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULORA_CONFIG = "modulora_config.json"
PEFT_PREFIX = "base_model.model."
_KEY = re.compile(r"base_model\.model\.(.+)\.lora_([AB])\.weight")
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")


def _layers(model: nn.Module) -> dict[str, ModuLoRALinear]:
    layers = {n: m for n, m in iter_modulora_layers(model) if m.r}
    if not layers:
        raise AdapterError("model has no ModuLoRA layers with LoRA; create it with "
                           "modulora.load(model, quantizer)")
    return layers


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base an adapter fits: config sizes and the adapted modules' ``[out, in]``."""
    cfg = getattr(model, "config", None)
    fp: dict[str, Any] = {k: getattr(cfg, k, None) for k in _FINGERPRINT_KEYS}
    fp["modules"] = {n: [m.out_features, m.in_features] for n, m in iter_modulora_layers(model)}
    return fp


def _target_modules(model: nn.Module, names: list[str]) -> list[str] | str:
    # Leaf names when PEFT's suffix matching would pick exactly these modules, else an anchored regex.
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    if {n for n, _ in model.named_modules() if n and matches_target(n, leaves)} == set(names):
        return leaves
    return "(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")"


def _quantizer_record(layers: dict[str, ModuLoRALinear], info: ModuLoRAInfo | None) -> dict[str, Any]:
    m = next(iter(layers.values())).quant_metadata()
    return {"quantizer": info.quantizer if info else m["quantizer_name"], "family": m["quantizer"],
            "config": m["config"], "plugin_version": m["plugin_version"],
            "format_version": m["format_version"]}


def save_adapter(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write the LoRA weights in the PEFT format: ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` per
    adapted module, keyed ``base_model.model.<module>.lora_{A,B}.weight``. Files are staged, then moved."""
    layers = _layers(model)
    ranks = {(m.r, m.alpha, m.scaling) for m in layers.values()}
    if len(ranks) != 1:
        raise AdapterError(f"LoRA layers have different (r, alpha, scaling): {sorted(ranks)}; the PEFT "
                           f"format written here needs one r and alpha for every module")
    r, alpha, _ = ranks.pop()
    first = next(iter(layers.values()))
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    cfg = getattr(model, "config", None)
    info: ModuLoRAInfo | None = getattr(model, "modulora_info", None)
    base_name = (info.base_model_name_or_path if info else None) or getattr(cfg, "_name_or_path", None)
    names = list(layers)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": alpha, "lora_dropout": dropout,
        "target_modules": _target_modules(model, names), "bias": "none", "fan_in_fan_out": False,
        "inference_mode": True, "base_model_name_or_path": base_name or None, "modules_to_save": None,
        "init_lora_weights": True, "use_rslora": False, "use_dora": False, "layers_to_transform": None,
        "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }
    tensors = {}
    for n, m in layers.items():
        tensors[f"{PEFT_PREFIX}{n}.lora_A.weight"] = m.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{PEFT_PREFIX}{n}.lora_B.weight"] = m.lora_B.weight.detach().contiguous().cpu()
    ours = {"modulora_version": modulora_version(), **_quantizer_record(layers, info),
            "lora": {"r": r, "alpha": alpha, "dropout": dropout}, "base_model": base_fingerprint(model)}
    with staged_writes(directory, last=(ADAPTER_CONFIG,)) as stage:
        st.save_file(tensors, str(stage / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        write_json(stage / MODULORA_CONFIG, ours)
        write_json(stage / ADAPTER_CONFIG, adapter_config)
    return Path(directory)


def _check_base(model: nn.Module, ours: dict[str, Any], d: Path, allow_other_quantizer: bool) -> None:
    want, have = ours.get("base_model", {}), base_fingerprint(model)
    diff = [k for k in _FINGERPRINT_KEYS if k in want and want[k] != have[k]]
    if diff or ("modules" in want and want["modules"] != have["modules"]):
        what = {k: (want[k], have[k]) for k in diff} or "the adapted modules or their shapes differ"
        raise AdapterError(f"adapter {d} was made for another base model ({want.get('model_type')}) than "
                           f"this one ({have['model_type']}): (adapter's, model's) = {what}")
    q = _quantizer_record(_layers(model), getattr(model, "modulora_info", None))
    if not allow_other_quantizer and (ours.get("family"), ours.get("config")) != (q["family"], q["config"]):
        raise AdapterError(f"adapter {d} was trained on quantizer {ours.get('quantizer')!r} "
                           f"({json.dumps(ours.get('config'))}) but this model uses {q['quantizer']!r} "
                           f"({json.dumps(q['config'])}); pass allow_other_quantizer=True to load it anyway")


def load_adapter(model: nn.Module, directory: str | os.PathLike, *,
                 allow_other_quantizer: bool = False) -> None:
    """Copy a PEFT-format LoRA adapter into the ModuLoRA layers of ``model`` (in place).

    Every adapted module must exist with the same rank and shapes; ``lora_alpha`` (and rsLoRA scaling) are
    taken from the adapter. ``modulora_config.json``, when present, must name this base and quantizer.
    """
    d = Path(directory)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (d / f).is_file()]
    if missing:
        raise AdapterError(f"{d} lacks {missing}; an adapter directory holds {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS}")
    cfg = read_json(d / ADAPTER_CONFIG, AdapterError)
    unsupported = [k for k in ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save") if cfg.get(k)]
    if cfg.get("peft_type") != "LORA" or unsupported:
        raise AdapterError(f"{d / ADAPTER_CONFIG} is not a plain LoRA adapter (peft_type "
                           f"{cfg.get('peft_type')!r}, unsupported settings {unsupported}); "
                           f"expected peft_type 'LORA' with one r and lora_alpha")
    if (d / MODULORA_CONFIG).is_file():
        _check_base(model, read_json(d / MODULORA_CONFIG, AdapterError), d, allow_other_quantizer)
    layers = _layers(model)
    tensors, _ = read_safetensors(d / ADAPTER_WEIGHTS, AdapterError)
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.fullmatch(key)
        if m is None:
            raise AdapterError(f"{d / ADAPTER_WEIGHTS} has key {key!r}; expected only "
                               f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight' "
                               f"(modules_to_save is unsupported)")
        found.setdefault(m.group(1), {})[m.group(2)] = t
    extra, absent = sorted(set(found) - set(layers)), sorted(set(layers) - set(found))
    if extra or absent:
        raise AdapterError(f"adapter {d} does not fit this model: modules only in the adapter {extra[:5]}, "
                           f"ModuLoRA layers without adapter weights {absent[:5]}")
    r, alpha = int(cfg.get("r", 0)), float(cfg.get("lora_alpha", 0))
    for n, layer in layers.items():
        a, b = found[n].get("A"), found[n].get("B")
        if layer.r != r:
            raise AdapterError(f"adapter {d} has rank r={r} but the model's LoRA rank is {layer.r}; load "
                               f"the base with modulora.load(..., lora=LoraConfig(r={r}))")
        if a is None or b is None or tuple(a.shape) != (r, layer.in_features) or \
                tuple(b.shape) != (layer.out_features, r):
            raise AdapterError(f"{n}: adapter has lora_A {None if a is None else tuple(a.shape)}, lora_B "
                               f"{None if b is None else tuple(b.shape)}; the layer needs lora_A "
                               f"{(r, layer.in_features)} and lora_B {(layer.out_features, r)}")
    for n, layer in layers.items():
        with torch.no_grad():
            layer.lora_A.weight.copy_(found[n]["A"])
            layer.lora_B.weight.copy_(found[n]["B"])
        layer.alpha = alpha
        layer.scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    info: ModuLoRAInfo | None = getattr(model, "modulora_info", None)
    if info is not None:
        info.lora = info.lora.model_copy(update={"r": r, "alpha": alpha})


def dequantize(model: PreTrainedModel, *, merge: bool = False) -> PreTrainedModel:
    """A new dense model of the same class and config: every ModuLoRALinear becomes an ``nn.Linear`` whose
    ``[out, in]`` weight is the materialized base (plus ``scaling * B @ A`` when ``merge``). The copy shares
    no tensor with ``model`` and saves/loads with ``save_pretrained`` / ``from_pretrained``."""
    layers = dict(iter_modulora_layers(model))
    if not layers:
        raise AdapterError("model has no ModuLoRA layers to dequantize")
    tied = tied_aliases(model)
    skip = tuple(n + "." for n in layers)
    sd = {k: t.detach().clone() for k, t in model.state_dict().items()
          if k not in tied and not k.startswith(skip)}
    with torch.no_grad():
        for n, layer in layers.items():
            w = layer.dense_weight(torch.float32)  # (out, in)
            if merge and layer.r:
                w = w + layer.lora_delta().to(w)
            sd[f"{n}.weight"] = w.to(layer.packed.dtype)
            if layer.bias is not None:
                sd[f"{n}.bias"] = layer.bias.detach().clone()
    dense = build_empty(copy.deepcopy(model.config), type(model))
    result = dense.load_state_dict(sd, strict=False, assign=True)
    if result.unexpected_keys:
        raise AdapterError(f"the dense {type(model).__name__} has no place for {result.unexpected_keys[:5]}")
    retie(dense, tied)
    check_no_meta(dense, f"the dense copy of {type(model).__name__}", AdapterError)
    if getattr(model, "generation_config", None) is not None:
        dense.generation_config = copy.deepcopy(model.generation_config)
    device = next(iter(layers.values())).lora_A.weight.device
    return dense.to(device).train(model.training)
