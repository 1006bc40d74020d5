"""GPTQ checkpoint directories, both ways: read one as a quantized model (no re-quantization), or write one.

A GPTQ checkpoint (GPTQModel, AutoGPTQ, transformers) is a Hugging Face model directory whose
``config.json`` has ``quantization_config`` with ``quant_method: "gptq"`` (or a ``quantize_config.json``
beside it) and whose safetensors hold, per quantized Linear, ``qweight``, ``qzeros``, ``scales``, ``g_idx``
(and ``bias``). Those tensors are our storage as they are, so loading copies no bit and changes none; the
model itself comes from the core's one builder, ``modulora_core.build_quantized_model``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch as st
import torch
from torch import nn

from modulora_core import (
    CheckpointError,
    PackedModule,
    PackedWeight,
    build_quantized_model,
    get_preset,
    iter_quantized_layers,
)

from .config import OPTQConfig, from_gptq_config, preset_name, to_gptq_config
from .packing import unpack_cols, zeros_v2_to_v1
from .storage import FAMILY, FORMAT_VERSION, check_tensors

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

PACKED_KEYS = ("qweight", "qzeros", "scales", "g_idx")
QUANTIZE_CONFIG = "quantize_config.json"
CONFIG = "config.json"


def gptq_quant_config(path: Any) -> dict[str, Any] | None:
    """The GPTQ quantization config of checkpoint directory ``path``, or None when it is not one."""
    if not isinstance(path, (str, os.PathLike)) or not Path(path).is_dir():
        return None
    d = Path(path)
    for name, key in ((CONFIG, "quantization_config"), (QUANTIZE_CONFIG, None)):
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


def _skeleton(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device. It only answers what the files do not record: each
    quantized module's ``[out, in]`` (a file may lack ``g_idx``, and packed lengths round up) and which
    tensors the model ties (a tied ``lm_head.weight`` is saved once, as the input embedding)."""
    import transformers
    from accelerate import init_empty_weights

    cls = next((getattr(transformers, a) for a in (config.architectures or []) if hasattr(transformers, a)), None)
    with init_empty_weights():
        return transformers.AutoModelForCausalLM.from_config(config) if cls is None else cls._from_config(config)


def _tied_keys(skeleton: nn.Module) -> dict[str, str]:
    """``{alias: source}`` state-dict keys the model ties (per its config)."""
    if hasattr(skeleton, "get_expanded_tied_weights_keys"):  # transformers 5
        return dict(skeleton.get_expanded_tied_weights_keys(all_submodels=True))
    out = skeleton.get_output_embeddings() if hasattr(skeleton, "get_output_embeddings") else None
    inp = skeleton.get_input_embeddings() if hasattr(skeleton, "get_input_embeddings") else None
    if out is None or inp is None or not getattr(skeleton.config, "tie_word_embeddings", False):
        return {}
    names = {id(m): n for n, m in skeleton.named_modules()}
    return {f"{names[id(out)]}.weight": f"{names[id(inp)]}.weight"}


def packed_from_tensors(t: dict[str, torch.Tensor], cfg: OPTQConfig, zeros_format: int, shape: tuple[int, int],
                        dtype: torch.dtype, where: str) -> PackedWeight:
    """Our PackedWeight over a GPTQ module's ``qweight``/``qzeros``/``scales``/``g_idx`` (v2 zeros become v1)."""
    n, k = shape
    t = dict(t)
    if "g_idx" not in t:  # some early checkpoints leave it out: the plain group order
        gs = cfg.group_size if cfg.group_size > 0 else k
        t["g_idx"] = (torch.arange(k, device=t["qweight"].device) // gs).to(torch.int32)
    if zeros_format == 2 and "qzeros" in t:  # a v2 file holds the zero points themselves
        t["qzeros"] = zeros_v2_to_v1(unpack_cols(t["qzeros"], cfg.bits, n), cfg.bits)
    check_tensors(t, cfg, shape, where)
    return PackedWeight(FAMILY, cfg, shape, dtype, {k_: v.contiguous() for k_, v in t.items()}, FORMAT_VERSION)


def load_gptq(path: str | os.PathLike, *, chunk_rows: int | None = None,
              dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A GPTQ checkpoint directory as a quantized transformers model over its packed tensors, bit for bit.

    No adapters: ``modulora.load(path)`` or ``peft.get_peft_model`` add them. ``chunk_rows`` as in
    ``modulora.load``; ``dtype`` casts the unquantized tensors and is what the layers dequantize to
    (default: the config's dtype, else that of the unquantized tensors as stored). The model's ``config.quantization_config`` is then ModuLoRA's,
    so ``save_pretrained`` writes our format; ``modulora.save_quantized(model, d, format="gptq")`` GPTQ again.
    """
    from transformers import AutoConfig, GenerationConfig

    d = Path(path)
    qc = gptq_quant_config(d)
    if qc is None:
        raise CheckpointError(f"{d} is not a GPTQ checkpoint (no quantization_config with quant_method 'gptq')")
    cfg, zeros_format = from_gptq_config(qc, str(d))
    config = AutoConfig.from_pretrained(d)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the builder converts the layers; transformers must not
    tensors = _read_tensors(d)
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not names:
        raise CheckpointError(f"{d} says it is GPTQ-quantized but its weights have no '*.qweight' tensors")
    skeleton = _skeleton(config)
    bound = dataclasses.replace(get_preset(cfg), name=preset_name(cfg))  # the installed plugin's version
    stored = next((t.dtype for k, t in tensors.items() if t.is_floating_point() and not k.endswith(".scales")), None)
    base_dtype = dtype or getattr(config, "dtype", None) or stored or torch.float16
    if isinstance(base_dtype, str):
        base_dtype = getattr(torch, base_dtype)
    modules: dict[str, PackedModule] = {}
    for name in names:
        try:
            old = skeleton.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{d}: quantized module {name} is not in the model built from config.json") from None
        if not isinstance(old, nn.Linear):
            raise CheckpointError(f"{d}: quantized module {name} is a {type(old).__name__} in the model, not an "
                                  "nn.Linear")
        packed_t = {k: tensors.pop(f"{name}.{k}") for k in PACKED_KEYS if f"{name}.{k}" in tensors}
        packed = packed_from_tensors(packed_t, cfg, zeros_format, (old.out_features, old.in_features), base_dtype,
                                     f"{d}: {name}")
        bias = tensors.pop(f"{name}.bias", None)
        modules[name] = PackedModule(packed, bound, None if bias is None else bias.to(base_dtype))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    # tied as transformers ties them: one tensor, saved once (a copy saved anyway is dropped)
    tied = {alias: src for alias, src in _tied_keys(skeleton).items() if alias.rpartition(".")[0] not in modules}
    for alias in tied:
        tensors.pop(alias, None)
    del skeleton
    model = build_quantized_model(config, modules, tensors, tied=tied, chunk_rows=chunk_rows, where=str(d))
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d)
    return model


@contextlib.contextmanager
def _staged(d: Path) -> Iterator[Path]:
    """A folder inside ``d`` whose files replace ``d``'s once the block succeeds (``config.json`` last);
    on an error nothing is moved, so an earlier checkpoint in ``d`` stays whole."""
    d.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".gptq-tmp-", dir=d))
    try:
        yield stage
        for name in sorted(os.listdir(stage), key=lambda n: n == CONFIG):
            os.replace(stage / name, d / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")  # PEFT's tensors in a state dict


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s own state dict: PEFT's adapter tensors left out, ``<m>.base_layer.<x>`` saved as ``<m>.<x>``
    (``get_peft_model`` wraps modules in place, so the model inside a PeftModel carries them)."""
    return {k.replace(".base_layer.", "."): t for k, t in model.state_dict().items() if not _ADAPTER_KEY.search(k)}


def save_gptq(model: nn.Module, directory: str | os.PathLike, *, tokenizer: Any = None) -> Path:
    """Write ``model`` (every QuantizedLinear optq, one config) as a GPTQ v1 checkpoint that transformers,
    GPTQModel and vLLM load: ``config.json`` with ``quantization_config``, ``quantize_config.json`` and
    ``model.safetensors``. ``model`` is the quantized transformers model, or a PeftModel over it: adapters
    are left out (PEFT's ``save_pretrained`` writes them). ``modulora.save_quantized(m, d, format="gptq")``
    calls this. All files are staged and moved into place at the end, so a failed save keeps an earlier one."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    merged = [n for n, m in model.named_modules() if getattr(m, "merged_adapters", None)]
    if merged:
        raise CheckpointError(f"{len(merged)} layers have merged adapters (e.g. {merged[0]}), so their base is "
                              "dense now; unmerge_adapter() first, or modulora.merge_requantized(model) to save "
                              "it merged")
    layers = {n.removesuffix(".base_layer"): m for n, m in iter_quantized_layers(model)}
    other = sorted({m.family for m in layers.values() if m.family != FAMILY})
    configs = {m.packed.config for m in layers.values() if m.family == FAMILY}
    if not layers or other or len(configs) != 1:
        raise CheckpointError(
            "format='gptq' needs every quantized layer to be optq with one config (GPTQ checkpoints have one "
            f"global quantize_config); this model has families {other or ['optq']} and {len(configs)} optq "
            "configs; save it with format='modulora' instead")
    cfg: OPTQConfig = next(iter(configs))
    skip = {f"{n}.{k}" for n, m in layers.items() for k, _ in m.named_buffers(recurse=False)}
    tensors: dict[str, torch.Tensor] = {}
    storages: set[Any] = set()
    for key, t in _base_state(model).items():
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
    out_emb = out_emb.get_base_layer() if hasattr(out_emb, "get_base_layer") else out_emb
    version = next(iter(layers.values())).plugin_version or "unknown"
    qc = to_gptq_config(cfg, lm_head=any(m is out_emb for m in layers.values()), version=version)
    conf = json.loads(model.config.to_json_string(use_diff=False))
    conf["quantization_config"] = qc  # GPTQ's, in place of ModuLoRA's
    conf["architectures"] = conf.get("architectures") or [type(model).__name__]
    with _staged(Path(directory)) as stage:
        st.save_file(tensors, str(stage / "model.safetensors"), metadata={"format": "pt"})
        (stage / CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
        (stage / QUANTIZE_CONFIG).write_text(json.dumps(qc, indent=2, sort_keys=True) + "\n")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
    return Path(directory)
