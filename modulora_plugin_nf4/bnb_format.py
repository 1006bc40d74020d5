"""Take over a bitsandbytes 4-bit model (transformers ``BitsAndBytesConfig(load_in_4bit=True)``) as it is.

Each ``bitsandbytes.nn.Linear4bit`` holds its packed codes (``Params4bit`` data, ``[ceil(n / 2), 1]``) and a
``quant_state`` (absmax, and for double quantization the 8-bit absmax with its scales, offset and map).
Our storage is the same bytes, so the conversion copies them into a :class:`PackedWeight`: nothing is
re-quantized and the dequantized weights stay bit-identical. bitsandbytes is never imported here: a model
can only contain its modules if the caller imported it already.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

from modulora_core import CheckpointError, ModuLoRAError, PackedWeight, QuantizerConfigError

from .blockwise import pack_nibbles
from .levels import NESTED_BLOCKSIZE, dynamic_map
from .quantizer import NF4Config, NF4Quantizer, check_tensors, preset_name


def is_linear4bit(module: nn.Module) -> bool:
    """True for a ``bitsandbytes.nn.Linear4bit`` (without importing bitsandbytes)."""
    bnb = sys.modules.get("bitsandbytes")
    cls = getattr(getattr(bnb, "nn", None), "Linear4bit", None)
    return cls is not None and isinstance(module, cls)


def linear4bit_names(model: nn.Module) -> list[str]:
    """Names of the ``Linear4bit`` modules of ``model``, in module order."""
    if "bitsandbytes" not in sys.modules:
        return []
    return [name for name, m in model.named_modules() if is_linear4bit(m)]


def is_bnb_4bit_checkpoint(path: Any) -> bool:
    """True when ``path`` is a local directory whose ``config.json`` records bitsandbytes 4-bit weights."""
    if not isinstance(path, (str, os.PathLike)) or not (Path(path) / "config.json").is_file():
        return False
    try:
        qc = json.loads((Path(path) / "config.json").read_text()).get("quantization_config") or {}
    except (OSError, ValueError, AttributeError):
        return False
    return qc.get("quant_method") == "bitsandbytes" and bool(qc.get("load_in_4bit") or qc.get("_load_in_4bit"))


def claims(model_or_path: Any) -> bool:
    """Whether this plugin reads ``model_or_path``: a model with Linear4bit modules or a bnb-4bit directory."""
    if isinstance(model_or_path, nn.Module):
        return bool(linear4bit_names(model_or_path))
    return is_bnb_4bit_checkpoint(model_or_path)


def _plain(t: torch.Tensor) -> torch.Tensor:
    # a Params4bit (a Parameter subclass) must not leak into module buffers: keep a plain tensor
    return t.data if isinstance(t, nn.Parameter) else t


_CPU_BLOCK_N = 32  # rows per tile of bitsandbytes' AVX512-BF16 CPU layout


def _from_cpu_layout(data: torch.Tensor, qs: Any, where: str) -> tuple[torch.Tensor, torch.Tensor, NF4Config]:
    """Row-major bytes ``[n / 2]``, float32 absmax ``[B]`` and config of a weight that bitsandbytes repacked
    for its AVX512-BF16 CPU kernels (``quant_state.packing_format_for_cpu``; its first eval forward does it).

    That layout tiles the codes as ``[out / 32, in / 2, 32, 2]`` (the tile's first 32 codes in the low
    nibbles) and keeps absmax as bfloat16 ``[in / blocksize, out]`` with double quantization undone. We keep
    exactly the weight bitsandbytes now computes with, bfloat16-rounded absmax included.
    """
    out_f, in_f = (int(s) for s in qs.shape)
    if out_f % _CPU_BLOCK_N or in_f % int(qs.blocksize):
        raise CheckpointError(f"{where}: CPU-repacked bitsandbytes weight of shape {(out_f, in_f)} is not tiled "
                              f"in {_CPU_BLOCK_N} rows x {qs.blocksize} columns; reload the bitsandbytes model")
    p = data.contiguous().view(torch.uint8).reshape(-1, _CPU_BLOCK_N)  # (tiles, 32)
    codes = torch.cat((p & 0xF, p >> 4), dim=-1)  # (tiles, 64)
    codes = codes.view(out_f // _CPU_BLOCK_N, in_f // 2, _CPU_BLOCK_N, 2).transpose(1, 2).reshape(-1)  # (n,)
    absmax = qs.absmax.detach().T.reshape(-1).to(torch.float32)  # (B,) in row-major block order
    cfg = NF4Config(quant_type=qs.quant_type, blocksize=int(qs.blocksize), double_quant=False)
    return pack_nibbles(codes), absmax, cfg


def packed_from_quant_state(data: torch.Tensor, quant_state: Any, where: str = "Linear4bit") -> PackedWeight:
    """A bitsandbytes 4-bit weight as our :class:`PackedWeight`, sharing no re-quantization.

    ``data``: the packed codes (any storage dtype; ``[ceil(n / 2), 1]`` as uint8); ``quant_state``: its
    ``bitsandbytes.functional.QuantState`` with ``shape`` ``(out, in)``.
    """
    qs = quant_state
    shape = tuple(int(s) for s in qs.shape)
    if len(shape) != 2:
        raise CheckpointError(f"{where}: bitsandbytes weight has shape {shape}; expected a 2-D [out, in] weight")
    if getattr(qs, "packing_format_for_cpu", False):
        codes, absmax, cfg = _from_cpu_layout(_plain(data).detach(), qs, where)
        tensors = {"codes": codes, "absmax": absmax}
        check_tensors(tensors, cfg, shape)
        return PackedWeight(NF4Quantizer.name, cfg, shape, getattr(qs, "original_dtype", torch.float32), tensors,
                            NF4Quantizer.format_version)
    try:
        cfg = NF4Config(quant_type=qs.quant_type, blocksize=int(qs.blocksize), double_quant=bool(qs.nested))
    except (QuantizerConfigError, ValueError) as e:
        raise CheckpointError(f"{where}: bitsandbytes 4-bit state is not one the nf4 plugin reads: {e}") from e
    codes = _plain(data).detach().contiguous().view(torch.uint8).reshape(-1)
    if cfg.double_quant:
        s2 = qs.state2
        if int(s2.blocksize) != NESTED_BLOCKSIZE:
            raise CheckpointError(f"{where}: double quantization in blocks of {s2.blocksize}; the nf4 plugin reads "
                                  f"blocks of {NESTED_BLOCKSIZE} (bitsandbytes' default)")
        tensors = {"codes": codes, "absmax": _plain(qs.absmax).detach().contiguous(),
                   "absmax_scale": _plain(s2.absmax).detach().to(torch.float32).contiguous(),
                   "absmax_offset": torch.as_tensor(qs.offset).detach().to(torch.float32).reshape(1).clone()}
        book = _plain(s2.code).detach().to(torch.float32)
        if not torch.equal(book.cpu(), dynamic_map()):  # e.g. a map from another bitsandbytes version
            tensors["absmax_code"] = book.contiguous()
    else:
        # float32 widening is exact, so a half-precision absmax loses nothing
        tensors = {"codes": codes, "absmax": _plain(qs.absmax).detach().to(torch.float32).contiguous()}
    check_tensors(tensors, cfg, shape)
    return PackedWeight(NF4Quantizer.name, cfg, shape, qs.dtype, tensors, NF4Quantizer.format_version)


def packed_from_linear4bit(module: nn.Module, where: str = "Linear4bit") -> PackedWeight:
    """The :class:`PackedWeight` of one ``bitsandbytes.nn.Linear4bit`` (its weight must be quantized)."""
    qs = getattr(module.weight, "quant_state", None)
    if qs is None:
        raise CheckpointError(f"{where}: Linear4bit weight has no quant_state (not quantized yet: bitsandbytes "
                              "quantizes on .to(device)); move the model to its device first")
    return packed_from_quant_state(module.weight, qs, where)


def _forget_bnb(model: nn.Module) -> None:
    # The model no longer holds bitsandbytes layers: drop transformers' record of them, so that saving,
    # .to() and the Trainer treat it as the plain model with ModuLoRA layers that it now is.
    hfq = getattr(model, "hf_quantizer", None)
    if hfq is not None and hasattr(hfq, "remove_quantization_config"):
        hfq.remove_quantization_config(model)
    else:
        for attr in ("hf_quantizer", "quantization_method"):
            if attr in vars(model):
                delattr(model, attr)
        cfg = getattr(model, "config", None)
        if cfg is not None and hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
    for m in model.modules():
        cfg = getattr(m, "config", None)
        if cfg is not None and getattr(cfg, "_is_quantized", False):
            cfg._is_quantized = False
    for attr in ("is_quantized", "is_loaded_in_4bit"):
        if attr in vars(model):
            setattr(model, attr, False)


def take_over(model_or_path: Any, *, chunk_rows: int | None = None) -> nn.Module:
    """Swap every ``Linear4bit`` of a bitsandbytes 4-bit model for a QuantizedLinear over the same bytes.

    ``model_or_path``: a model with Linear4bit modules (modified in place and returned) or a directory that
    transformers saved from one (loaded on the CPU first). ``chunk_rows`` as in ``modulora.load``. The
    result is a ModuLoRA model (``config.quantization_config`` is a ``ModuLoRAConfig``) without adapters.
    """
    from modulora_core import ModuLoRAConfig, get_preset, mark_quantized, replace_linear

    if isinstance(model_or_path, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_or_path), dtype=torch.float32)
    else:
        model = model_or_path
    names = linear4bit_names(model)
    if not names:
        raise ModuLoRAError(f"{type(model).__name__} has no bitsandbytes Linear4bit modules to take over; "
                            "load it with BitsAndBytesConfig(load_in_4bit=True), or pass a quantizer name")
    bound = None
    for name in names:
        old = model.get_submodule(name)
        packed = packed_from_linear4bit(old, where=name)
        # the installed plugin's version, and the preset's name ("fp4-nodq"), for checkpoints
        bound = dataclasses.replace(get_preset(packed.config), name=preset_name(packed.config))
        replace_linear(model, name, packed, bound, chunk_rows=chunk_rows,
                       bias=None if old.bias is None else old.bias.detach())
        del old
    _forget_bnb(model)
    return mark_quantized(model, ModuLoRAConfig(bound, chunk_rows=chunk_rows))
