"""GPTQ checkpoint directories, both ways: take one over with LoRA (no re-quantization), or write one.

A GPTQ checkpoint (GPTQModel, AutoGPTQ, transformers) is a Hugging Face model directory whose
``config.json`` has ``quantization_config`` with ``quant_method: "gptq"`` (or a ``quantize_config.json``
beside it) and whose safetensors hold, per quantized Linear, ``qweight``, ``qzeros``, ``scales``, ``g_idx``
(and ``bias``). Those tensors are our storage as they are, so loading copies no bit and changes none.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import safetensors.torch as st
import torch
from torch import nn

from modulora_core import (
    CheckpointError,
    LoraConfig,
    ModuLoRAInfo,
    ModuLoRALinear,
    PackedWeight,
    finalize_model,
    get_quantizer,
    matches_target,
    replace_linear,
)

from .config import OPTQConfig, from_gptq_config, preset_name, to_gptq_config
from .packing import unpack_cols, zeros_v2_to_v1
from .storage import FAMILY, FORMAT_VERSION, check_tensors

PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZE_CONFIG = "quantize_config.json"


def gptq_quant_config(path: Any) -> dict[str, Any] | None:
    """The GPTQ quantization config of checkpoint directory ``path``, or None when it is not one."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return None
    d = Path(path)
    for name, key in (("config.json", "quantization_config"), (QUANTIZE_CONFIG, None)):
        try:
            data = json.loads((d / name).read_text())
        except (OSError, ValueError):
            continue
        qc = data.get(key) if key and isinstance(data, dict) else data
        if isinstance(qc, dict) and str(qc.get("quant_method") or qc.get("method") or "").lower() == "gptq":
            return qc
    return None


def is_gptq_checkpoint(path: Any) -> bool:
    """True when ``path`` is a directory holding a GPTQ checkpoint."""
    return gptq_quant_config(path) is not None


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    index = d / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in d.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{d} has no *.safetensors weights; the optq plugin reads GPTQ checkpoints saved "
                              "as safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            tensors.update(st.load_file(str(d / f)))
        except Exception as e:  # noqa: BLE001 - truncated or corrupted file
            raise CheckpointError(f"cannot read {d / f} ({type(e).__name__}: {e}); the file is truncated or "
                                  "corrupted") from e
    return tensors


def _build_empty(d: Path) -> nn.Module:
    """The model of ``d``'s config, without its quantization_config, with parameters on the meta device."""
    import transformers
    from accelerate import init_empty_weights

    config = transformers.AutoConfig.from_pretrained(d)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we convert the layers ourselves; transformers must not
    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    with init_empty_weights():  # parameters only: buffers computed in __init__ (RoPE) stay real
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(config)
        return cls._from_config(config)


def packed_from_tensors(t: dict[str, torch.Tensor], cfg: OPTQConfig, zeros_format: int, shape: tuple[int, int],
                        dtype: torch.dtype, where: str) -> PackedWeight:
    """Our PackedWeight over a GPTQ module's ``qweight``/``qzeros``/``scales``/``g_idx`` (v2 zeros become v1)."""
    n, k = shape
    t = dict(t)
    if "g_idx" not in t:  # some early checkpoints leave it out: the plain group order
        gs = cfg.group_size if cfg.group_size > 0 else k
        t["g_idx"] = (torch.arange(k) // gs).to(torch.int32)
    if zeros_format == 2 and "qzeros" in t:  # a v2 file holds the zero points themselves
        t["qzeros"] = zeros_v2_to_v1(unpack_cols(t["qzeros"], cfg.bits, n), cfg.bits)
    check_tensors(t, cfg, shape, where)
    return PackedWeight(FAMILY, cfg, shape, dtype, {k_: v.contiguous() for k_, v in t.items()}, FORMAT_VERSION)


def load_gptq(path: str | os.PathLike, *, lora: Any = None, chunk_rows: int | None = None,
              dtype: torch.dtype | None = None) -> nn.Module:
    """A GPTQ checkpoint directory as a model with ModuLoRA layers over its packed tensors, bit for bit.

    ``lora`` (default ``LoraConfig()``) attaches to every quantized module; ``chunk_rows`` as in
    ``modulora.load``; ``dtype`` casts the unquantized tensors (default: as stored).
    """
    from transformers import GenerationConfig

    d = Path(path)
    qc = gptq_quant_config(d)
    if qc is None:
        raise CheckpointError(f"{d} is not a GPTQ checkpoint (no quantization_config with quant_method 'gptq')")
    cfg, zeros_format = from_gptq_config(qc, str(d))
    model = _build_empty(d)
    tensors = _read_tensors(d)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{d} says it is GPTQ-quantized but its weights have no '*.qweight' tensors")
    lcfg = lora or LoraConfig()
    if lcfg.target_modules not in (None, "all-linear") and not all(matches_target(n, lcfg.target_modules)
                                                                   for n in names):
        warnings.warn(f"LoRA attaches to every GPTQ-quantized module ({len(names)}); target_modules="
                      f"{lcfg.target_modules!r} does not change which", stacklevel=2)
    bound = get_quantizer(cfg)  # the installed plugin's version, for checkpoints we write later
    quantizer = bound.quantizer
    base_dtype = dtype or getattr(model.config, "dtype", None) or torch.float16
    if isinstance(base_dtype, str):
        base_dtype = getattr(torch, base_dtype)
    for name in names:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{d}: quantized module {name} is not in the model built from config.json") from None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{d}: quantized module {name} is a {type(old).__name__} in the model, not an "
                                  "nn.Linear")
        shape = (old.out_features, old.in_features)
        packed_t = {k: tensors.pop(f"{name}.{k}") for k in PACKED_KEYS if f"{name}.{k}" in tensors}
        packed = packed_from_tensors(packed_t, cfg, zeros_format, shape, base_dtype, f"{d}: {name}")
        bias = tensors.pop(f"{name}.bias", None)
        replace_linear(model, name, packed, quantizer, lora=lcfg, chunk_rows=chunk_rows,
                       bias=None if bias is None else bias.to(base_dtype), quantizer_name=preset_name(cfg),
                       plugin_version=bound.version)
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{d} has tensors the model lacks: {result.unexpected_keys[:5]}")
    if getattr(model.config, "tie_word_embeddings", False) and hasattr(model, "tie_weights"):
        model.tie_weights()  # the output embedding is saved once, as the input embedding
    left = [n for n, p in [*model.named_parameters(), *model.named_buffers()] if p.is_meta]
    if left:
        raise CheckpointError(f"{d} has no values for {len(left)} tensors, e.g. {left[:5]}; it is incomplete")
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d)
    model.eval()
    info = ModuLoRAInfo.from_bound(bound, lora=lcfg, chunk_rows=chunk_rows, modules=names,
                                   base_model_name_or_path=getattr(model.config, "_name_or_path", None) or str(d))
    info.quantizer = preset_name(cfg)
    return finalize_model(model, info)


def save_gptq(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Write ``model`` (every ModuLoRA layer optq, one config) as a GPTQ v1 checkpoint that transformers,
    GPTQModel and vLLM load: ``config.json`` with ``quantization_config``, ``quantize_config.json`` and
    ``model.safetensors``. LoRA weights are not included (``modulora.save_adapter`` writes them)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ModuLoRALinear)}
    other = sorted({m.quantizer.name for m in layers.values() if m.quantizer.name != FAMILY})
    configs = {m.packed.config for m in layers.values() if m.quantizer.name == FAMILY}
    if not layers or other or len(configs) != 1:
        raise CheckpointError(
            "format='gptq' needs every quantized layer to be optq with one config (GPTQ checkpoints have one "
            f"global quantize_config); this model has families {other or ['optq']} and {len(configs)} optq "
            "configs; save it with format='modulora' instead")
    cfg: OPTQConfig = next(iter(configs))
    skip = {f"{n}.{p}" for n in layers for p in ("lora_A.weight", "lora_B.weight")}
    skip |= {f"{n}.packed_{k}" for n, m in layers.items() for k in m.packed.tensors}
    tensors: dict[str, torch.Tensor] = {}
    storages: set[Any] = set()
    for key, t in model.state_dict().items():
        if key in skip:
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if ident in storages:  # a tied alias (lm_head = embed_tokens): transformers reties it on load
            continue
        storages.add(ident)
        tensors[key] = t.detach().contiguous().cpu()
    for name, m in layers.items():
        p = m.packed
        tensors[f"{name}.qweight"] = p.tensors["qweight"].contiguous().cpu()
        tensors[f"{name}.qzeros"] = p.tensors["qzeros"].contiguous().cpu()
        tensors[f"{name}.scales"] = p.tensors["scales"].to(torch.float16).contiguous().cpu()
        tensors[f"{name}.g_idx"] = p.tensors["g_idx"].to(torch.int32).contiguous().cpu()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    version = getattr(next(iter(layers.values())), "plugin_version", None) or "unknown"
    qc = to_gptq_config(cfg, lm_head=any(m is out_emb for m in layers.values()), version=version)
    conf = json.loads(model.config.to_json_string(use_diff=False))
    conf["quantization_config"] = qc
    conf["architectures"] = conf.get("architectures") or [type(model).__name__]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tmp = d / ".model.safetensors.tmp"
    st.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, d / "model.safetensors")  # whole or not at all
    (d / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    (d / QUANTIZE_CONFIG).write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(d)
    if tokenizer is not None:
        tokenizer.save_pretrained(d)
    return d

