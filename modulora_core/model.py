"""Model surgery: quantize a causal LM's linears into ModuLoRALinear, and save/load the quantized base.

``load`` swaps every targeted ``nn.Linear`` for a :class:`ModuLoRALinear`, one layer at a time (the dense
weight is dropped as soon as its packed form exists). ``save_quantized`` writes the packed base with the HF
config; ``load_quantized`` rebuilds the model on the meta device and assigns the saved tensors: it never
re-quantizes. transformers is imported lazily so ``import modulora`` stays light.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import uuid
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import safetensors.torch as st
import torch
from torch import nn

from .builtin_format import QUANT_INDEX, WEIGHTS_FILE, is_modulora_checkpoint
from .calibrate import decoder_blocks, quantize_blockwise
from .calibration_data import Calibration, calibration_tokens, resolve_calibration
from .errors import (
    CalibrationError,
    CheckpointError,
    ModuLoRAError,
    TargetModulesError,
    UnknownQuantizerError,
)
from .export import export_checkpoint
from .files import read_json, read_safetensors, staged_writes, tensors_digest, write_json
from .layers import PACKED_PREFIX, ModuLoRALinear
from .lora_config import LoraConfig
from .quantizer import PackedWeight, Quantizer, QuantizerConfig
from .registry import BoundQuantizer, Family, available_quantizers, get_family, get_quantizer, get_registry

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

CONFIG_FILE = "config.json"
LAYOUT_VERSION = 1  # version of our directory layout (index + weights file), not of any quantizer's format
QuantizerLike: TypeAlias = str | QuantizerConfig | BoundQuantizer  # a preset name, a config, or resolved


@dataclass
class ModuLoRAInfo:
    """What ``load`` / ``load_quantized`` record on the model as ``model.modulora_info``."""

    quantizer: str  # preset name, e.g. "rtn-4bit"
    family: str
    config: str  # the quantizer config as JSON
    plugin: str | None
    plugin_version: str | None
    format_version: int
    lora: LoraConfig
    chunk_rows: int | None
    modules: list[str] = field(default_factory=list)
    base_model_name_or_path: str | None = None

    @classmethod
    def from_bound(cls, bq: BoundQuantizer, *, lora: LoraConfig, chunk_rows: int | None, modules: list[str],
                   base_model_name_or_path: str | None = None) -> ModuLoRAInfo:
        """The record for layers quantized (or converted) with ``bq``."""
        fam = get_family(bq.family)
        return cls(quantizer=bq.name, family=bq.family, config=bq.config.to_json(),
                   plugin=fam.distribution or bq.plugin, plugin_version=bq.version,
                   format_version=bq.quantizer.format_version, lora=lora, chunk_rows=chunk_rows,
                   modules=modules, base_model_name_or_path=base_model_name_or_path)


# -- small helpers --------------------------------------------------------------------------------------
def modulora_version() -> str:
    try:
        return md.version("modulora")
    except md.PackageNotFoundError:
        return "unknown"


def iter_modulora_layers(model: nn.Module) -> Iterator[tuple[str, ModuLoRALinear]]:
    """``(module name, layer)`` for every ModuLoRALinear in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, ModuLoRALinear):
            yield name, m


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable LoRA weights: ``lora_A`` ``[r, in]`` and ``lora_B`` ``[out, r]`` of every layer."""
    return [p for _, m in iter_modulora_layers(model) if m.r for p in (m.lora_A.weight, m.lora_B.weight)]


def set_adapter_enabled(model: nn.Module, enabled: bool) -> None:
    """Turn every LoRA branch on or off (off: the model computes the quantized base alone)."""
    for _, m in iter_modulora_layers(model):
        m.adapter_enabled = bool(enabled)


def matches_target(name: str, target_modules: list[str] | str) -> bool:
    """PEFT semantics: a list matches by name or ``.``-suffix, a string is a regex for ``re.fullmatch``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def select_targets(model: nn.Module, target_modules: list[str] | str | None) -> list[str]:
    """Names of the ``nn.Linear`` modules to quantize; ``TargetModulesError`` when none match."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if target_modules is None:
        blocks = decoder_blocks(model)
        if blocks is None:
            raise TargetModulesError(
                f"found no decoder-block ModuleList in {type(model).__name__}; pass "
                f"LoraConfig(target_modules=[...]) naming linears such as {linears[:6]}"
            )
        names = [n for n in linears if n.startswith(blocks + ".")]
    elif target_modules == "all-linear":
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = [n for n in linears if model.get_submodule(n) is not out]  # PEFT also skips the LM head
    else:
        try:
            names = [n for n in linears if matches_target(n, target_modules)]
        except re.error as e:
            raise TargetModulesError(f"target_modules {target_modules!r} is not a valid regex: {e}") from e
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise TargetModulesError(
            f"no nn.Linear in {type(model).__name__} matches target_modules={target_modules!r}. Linear "
            f"leaf names here: {leaves}; e.g. full names {linears[:4]}"
        )
    return names


def tied_aliases(model: nn.Module) -> dict[str, str]:
    """``{alias key: source key}`` for state-dict entries that share storage (tied embeddings)."""
    seen: dict[Any, str] = {}
    tied: dict[str, str] = {}
    for key, t in model.state_dict(keep_vars=True).items():
        if t.is_meta or t.numel() == 0:
            ident: Any = id(t)
        else:
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                     tuple(t.stride()), t.dtype)
        if ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
    return tied


def retie(model: nn.Module, tied: Mapping[str, str]) -> None:
    """Make each alias the very same tensor as its source (what ``tie_weights`` does for embeddings)."""
    for alias, source in tied.items():
        a_mod, _, a_name = alias.rpartition(".")
        s_mod, _, s_name = source.rpartition(".")
        setattr(model.get_submodule(a_mod), a_name, getattr(model.get_submodule(s_mod), s_name))


def build_empty(config: PretrainedConfig, cls: type | None = None) -> PreTrainedModel:
    """The model of ``config`` with its parameters on the meta device (buffers such as RoPE's inv_freq
    are real), ready for ``load_state_dict(..., assign=True)``."""
    import transformers
    from accelerate import init_empty_weights

    if cls is None:
        for arch in config.architectures or []:
            cls = getattr(transformers, arch, None)
            if cls is not None:
                break
    with init_empty_weights():  # parameters only: buffers computed in __init__ must stay real
        if cls is None:
            return transformers.AutoModelForCausalLM.from_config(config)
        return cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)


def check_no_meta(model: nn.Module, what: str, error: type[Exception] = CheckpointError) -> None:
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise error(f"{what} has no values for {len(left)} tensors, e.g. {left[:5]}; it is incomplete")


# -- load: quantize a dense model -------------------------------------------------------------------------
def load(model: PreTrainedModel | str | os.PathLike, quantizer: QuantizerLike | None = None, *,
         lora: LoraConfig | None = None, calibration: Any = None, chunk_rows: int | None = None,
         torch_dtype: torch.dtype | None = None, n_samples: int | None = None,
         seq_len: int | None = None) -> PreTrainedModel:
    """Quantize the targeted linears of a causal LM with ``quantizer`` and attach LoRA adapters.

    ``model``: a transformers causal LM (modified in place and returned) or a path / model id (loaded in
    ``torch_dtype``, float32 by default). With ``quantizer=None`` the model must be in a format a plugin
    recognizes, e.g. a ``save_quantized`` directory. ``lora`` defaults to ``LoraConfig()`` (or, for a
    saved checkpoint, to the one it records). ``calibration``, for quantizers that need it: token ids
    (``[n, t]`` tensor or a list of sequences), a text file, a ``datasets`` dataset or a
    :class:`~modulora_core.calibration_data.Calibration`, cut to ``n_samples`` x ``seq_len`` tokens and run
    block by block (:mod:`modulora_core.calibrate`); or precomputed ``{module name: X^T X [in, in]}``.
    Each ``[out, in]`` weight becomes packed buffers plus ``lora_A`` ``[r, in]`` and ``lora_B``
    ``[out, r]``, the only trainable parameters.
    """
    own_ckpt = isinstance(model, (str, os.PathLike)) and is_modulora_checkpoint(model)
    if quantizer is None or own_ckpt:
        if own_ckpt:  # already quantized: with a quantizer name, only check it matches
            return load_quantized(model, lora=lora, chunk_rows=chunk_rows, quantizer=quantizer)
        loader = get_registry().detect_format(model)
        if loader is None:
            raise UnknownQuantizerError(
                f"no quantizer given and no installed plugin recognizes {_describe(model)} as already "
                f"quantized. Pass quantizer=one of: {', '.join(available_quantizers()) or '(none installed)'}"
            )
        return loader(model, lora=lora, chunk_rows=chunk_rows)

    bq = quantizer if isinstance(quantizer, BoundQuantizer) else get_quantizer(quantizer)
    if isinstance(model, nn.Module) and (loader := get_registry().detect_format(model)) is not None:
        return _take_over_as(model, loader, bq, lora=lora, chunk_rows=chunk_rows)
    lora = lora or LoraConfig()
    cal = resolve_calibration(bq.name, bq.capabilities().needs_calibration, calibration, n_samples, seq_len)
    source = model if isinstance(model, (str, os.PathLike)) else getattr(model, "name_or_path", None) or None
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch_dtype or torch.float32)
    elif torch_dtype is not None:
        model = model.to(torch_dtype)
    if any(True for _ in iter_modulora_layers(model)):
        raise ModuLoRAError("model already has ModuLoRA layers; load the dense model instead, or "
                            "save_quantized this one and load that")
    names = select_targets(model, lora.target_modules)
    if isinstance(cal, Mapping) and (absent := [n for n in names if n not in cal]):
        raise CalibrationError(f"calibration has no Hessian for {len(absent)} target modules, e.g. "
                               f"{absent[:3]}; give one [in, in] X^T X per module")

    tied = tied_aliases(model)
    tied_before = set(tied) | set(tied.values())
    if isinstance(cal, Calibration):  # Hessians from data, one decoder block at a time
        quantize_blockwise(model, names, calibration_tokens(cal, source),
                           lambda n, h: _swap_in(model, n, bq, lora, chunk_rows, h), cal, desc=bq.name)
    else:
        for name in names:
            _swap_in(model, name, bq, lora, chunk_rows, None if cal is None else cal[name])
    if any(f"{n}.weight" in tied_before for n in names) and hasattr(model.config, "tie_word_embeddings"):
        # a quantized lm_head no longer shares the embedding's storage: stop transformers retying them
        model.config.tie_word_embeddings = False
    info = ModuLoRAInfo.from_bound(bq, lora=lora, chunk_rows=chunk_rows, modules=names,
                                   base_model_name_or_path=getattr(model.config, "_name_or_path", None))
    return finalize_model(model, info)


def _take_over_as(model: nn.Module, loader: Any, bq: BoundQuantizer, **kw: Any) -> PreTrainedModel:
    """A model already quantized elsewhere (e.g. bitsandbytes 4-bit): its dense weights are gone, so it is
    converted as it is; the requested quantizer must be the one it was quantized with."""
    model = loader(model, **kw)
    info: ModuLoRAInfo = model.modulora_info
    if info.family != bq.family or json.loads(info.config) != json.loads(bq.config.to_json()):
        raise ModuLoRAError(
            f"the model is already quantized as {info.quantizer!r} ({info.config}), so it cannot be "
            f"quantized with {bq.name!r}: its dense weights are gone. It has been converted as "
            f"{info.quantizer!r}; call modulora.load(model) without quantizer=, or load the dense model"
        )
    return model


def _describe(model: Any) -> str:
    return repr(str(model)) if isinstance(model, (str, os.PathLike)) else f"a {type(model).__name__} instance"


def _swap_in(model: nn.Module, name: str, bq: BoundQuantizer, lora: LoraConfig, chunk_rows: int | None,
             hessian: torch.Tensor | None) -> None:
    old: nn.Linear = model.get_submodule(name)
    weight = old.weight.detach()  # (out, in)
    packed = bq.quantize(weight.to(torch.float32), hessian)
    packed.dtype = weight.dtype  # remember the model's dtype (export, dense_weight), not the compute one
    replace_linear(model, name, packed, bq.quantizer, lora=lora, chunk_rows=chunk_rows,
                   bias=None if old.bias is None else old.bias.detach(), quantizer_name=bq.name,
                   plugin_version=bq.version)
    # the last reference to the dense weight goes here (unless tied), so peak memory stays one layer
    del old, weight


def replace_linear(model: nn.Module, name: str, packed: PackedWeight, quantizer: Quantizer, *,
                   lora: LoraConfig, bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                   quantizer_name: str | None = None, plugin_version: str | None = None) -> ModuLoRALinear:
    """Put a ModuLoRALinear over ``packed`` (``[out, in]``) in place of module ``name``; returns it.

    For plugins that take over models quantized elsewhere (their packed data converted, not recomputed).
    """
    parent_name, _, leaf = name.rpartition(".")
    layer = ModuLoRALinear(packed, quantizer, r=lora.r, alpha=lora.alpha, dropout=lora.dropout, bias=bias,
                           chunk_rows=chunk_rows, quantizer_name=quantizer_name, plugin_version=plugin_version)
    setattr(model.get_submodule(parent_name) if parent_name else model, leaf, layer.to(packed.device))
    return layer


def finalize_model(model: nn.Module, info: ModuLoRAInfo) -> nn.Module:
    """Freeze everything but LoRA A/B and record ``info`` as ``model.modulora_info``; returns ``model``."""
    _freeze_base(model)
    model.modulora_info = info
    return model


def _freeze_base(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    for p in lora_parameters(model):
        p.requires_grad_(True)


# -- save_quantized / load_quantized -----------------------------------------------------------------------
def save_quantized(model: PreTrainedModel, directory: str | os.PathLike, *, tokenizer: Any = None,
                   format: str = "modulora") -> Path:
    """Write the quantized base (packed tensors + every non-LoRA tensor) with the HF config to ``directory``.

    Files: ``config.json``, ``modulora_model.safetensors`` and the index ``modulora_quant.json``. LoRA
    weights are not included (``save_adapter`` writes them). Each file is written to a staging name first.
    ``format`` other than ``"modulora"`` (e.g. ``"gptq"``) is written by the layers' plugin, if it offers it.
    """
    layers = dict(iter_modulora_layers(model))
    if not layers:
        raise CheckpointError("model has no ModuLoRA layers; quantize it first (modulora.load(model, name))")
    if format != "modulora":
        return export_checkpoint(model, layers, directory, format, tokenizer=tokenizer)
    lora_keys = {f"{n}.lora_{ab}.weight" for n in layers for ab in "AB"}
    tied = tied_aliases(model)
    tensors = {k: t.detach().contiguous().cpu() for k, t in model.state_dict().items()
               if k not in lora_keys and k not in tied}
    info: ModuLoRAInfo | None = getattr(model, "modulora_info", None)
    first = next(iter(layers.values()))
    lora = info.lora if info else LoraConfig(r=max(first.r, 1), alpha=first.alpha)
    reg = get_registry()
    modules = {}
    for n, layer in layers.items():
        m = layer.quant_metadata()
        fam = reg.families.get(m["quantizer"])
        modules[n] = {
            "quantizer": m["quantizer_name"], "family": m["quantizer"], "config": m["config"],
            "plugin": (fam.distribution or fam.plugin) if fam else None,
            "plugin_version": m["plugin_version"],
            "format_version": m["format_version"], "shape": m["shape"], "dtype": m["dtype"],
            "has_bias": m["has_bias"], "extra": m["extra"], "tensors": sorted(layer.packed.tensors),
        }
    index = {
        "format": "modulora-quantized", "layout_version": LAYOUT_VERSION,
        "modulora_version": modulora_version(), "checkpoint_id": uuid.uuid4().hex,
        "weights_file": WEIGHTS_FILE, "model_type": model.config.model_type,
        "base_model_name_or_path": (info.base_model_name_or_path if info else None)
        or getattr(model.config, "_name_or_path", None),
        "lora": lora.model_dump(mode="json"), "chunk_rows": info.chunk_rows if info else first.chunk_rows,
        "tied": tied, "modules": modules, "sha256": tensors_digest(tensors),
    }
    meta = {"format": "pt", "modulora_version": index["modulora_version"],
            "modulora_checkpoint_id": index["checkpoint_id"],
            "modulora_index": json.dumps(index, sort_keys=True)}
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    with staged_writes(directory, last=(WEIGHTS_FILE, QUANT_INDEX)) as stage:
        model.config.save_pretrained(stage)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(stage)
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        st.save_file(tensors, str(stage / WEIGHTS_FILE), metadata=meta)
        write_json(stage / QUANT_INDEX, index)
    return Path(directory)


def _major_minor(v: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)(?:\.(\d+))?", v or "")
    return (int(m.group(1)), int(m.group(2) or 0)) if m else None


def _check_entry(d: Path, name: str, e: Mapping[str, Any]) -> Family:
    """The installed family for index entry ``e``, after the family/format/plugin-version checks."""
    try:
        fam = get_family(e["family"])
    except UnknownQuantizerError as err:
        raise CheckpointError(
            f"{d} was quantized with family {e['family']!r} (preset {e.get('quantizer')!r}, plugin "
            f"{e.get('plugin')} {e.get('plugin_version')}), which no installed plugin provides: {err}"
        ) from None
    want, have = int(e["format_version"]), fam.quantizer.format_version
    if want != have:
        raise CheckpointError(
            f"{d}: module {name} is stored in {e['family']!r} format_version {want} (plugin version "
            f"{e.get('plugin_version')}), but the installed plugin {fam.plugin} {fam.version} reads "
            f"format_version {have}; install the plugin version that wrote it, or quantize the dense "
            f"model again"
        )
    saved, installed = _major_minor(e.get("plugin_version")), _major_minor(fam.version)
    if saved and installed and saved[0] != installed[0]:
        raise CheckpointError(
            f"{d} was written by {fam.plugin} {e.get('plugin_version')} but {fam.version} is installed "
            f"(another major version); install {fam.plugin}=={e.get('plugin_version')} or quantize the "
            f"dense model again"
        )
    if saved and installed and saved != installed:
        warnings.warn(f"{d} was written by {fam.plugin} {e.get('plugin_version')}; {fam.version} is "
                      f"installed", stacklevel=3)
    return fam


def _check_requested(d: Path, quantizer: QuantizerLike, entries: Mapping) -> None:
    bq = quantizer if isinstance(quantizer, BoundQuantizer) else get_quantizer(quantizer)
    for e in entries.values():
        if e["family"] != bq.family or e["config"] != json.loads(bq.config.to_json()):
            raise CheckpointError(
                f"{d} holds weights quantized with {e['quantizer']!r} ({json.dumps(e['config'])}), not the "
                f"requested {bq.name!r} ({bq.config.to_json()}); omit quantizer= to load it as saved, or "
                f"modulora.load(<dense model>, {bq.name!r}) to quantize again"
            )


def load_quantized(directory: str | os.PathLike, *, lora: LoraConfig | None = None,
                   chunk_rows: int | None = None, quantizer: QuantizerLike | None = None,
                   verify: bool = True) -> PreTrainedModel:
    """Rebuild a ``save_quantized`` checkpoint: model on meta, ModuLoRALinear from the packed tensors,
    fresh LoRA (``lora`` or the recorded LoraConfig; ``chunk_rows`` None = the recorded one). No
    re-quantization. ``quantizer``, if given, must name the checkpoint's quantizer. ``verify`` checks the
    tensors' SHA-256 recorded at save time (one pass over the data)."""
    from transformers import AutoConfig, GenerationConfig

    d = Path(directory)
    if not d.is_dir():
        raise CheckpointError(f"{d} is not a directory; expected one written by modulora.save_quantized")
    missing = [f for f in (QUANT_INDEX, WEIGHTS_FILE, CONFIG_FILE) if not (d / f).is_file()]
    if missing:
        raise CheckpointError(f"{d} lacks {missing}; a save_quantized directory holds {QUANT_INDEX}, "
                              f"{WEIGHTS_FILE} and {CONFIG_FILE}")
    index = read_json(d / QUANT_INDEX, CheckpointError)
    entries = index.get("modules") if isinstance(index, dict) else None
    if not isinstance(entries, dict) or not entries:
        raise CheckpointError(f"{d / QUANT_INDEX} lists no quantized modules; it is not a modulora index")
    if index.get("layout_version", LAYOUT_VERSION) > LAYOUT_VERSION:
        raise CheckpointError(f"{d} uses checkpoint layout {index['layout_version']} (modulora "
                              f"{index.get('modulora_version')}); upgrade modulora to read it")
    families = {n: _check_entry(d, n, e) for n, e in entries.items()}
    if quantizer is not None:
        _check_requested(d, quantizer, entries)
    tensors, meta = read_safetensors(d / WEIGHTS_FILE, CheckpointError)
    if meta.get("modulora_checkpoint_id") != index.get("checkpoint_id"):
        raise CheckpointError(f"{d / WEIGHTS_FILE} and {d / QUANT_INDEX} come from different saves "
                              f"(an interrupted save?); save the model again")
    if verify and index.get("sha256") and tensors_digest(tensors) != index["sha256"]:
        raise CheckpointError(f"{d / WEIGHTS_FILE}: tensor data does not match the SHA-256 recorded in "
                              f"{QUANT_INDEX}; the file is corrupted, save it again")

    model = build_empty(AutoConfig.from_pretrained(d))
    lcfg = lora or LoraConfig(**index.get("lora", {}))
    if lcfg.target_modules not in (None, "all-linear") and not all(
            matches_target(n, lcfg.target_modules) for n in entries):
        warnings.warn(f"LoRA attaches to every quantized module of {d} ({len(entries)}); target_modules="
                      f"{lcfg.target_modules!r} does not change which", stacklevel=2)
    cr = chunk_rows if chunk_rows is not None else index.get("chunk_rows")
    for name, e in entries.items():
        fam = families[name]
        try:
            parent_name, _, leaf = name.rpartition(".")
            old = model.get_submodule(name)
            packed_t = {k: tensors.pop(f"{name}.{PACKED_PREFIX}{k}") for k in e["tensors"]}
            bias = tensors.pop(f"{name}.bias") if e["has_bias"] else None
        except (AttributeError, KeyError) as err:
            raise CheckpointError(f"{d}: module {name} is in the index but {err} is missing from the model "
                                  f"built from {CONFIG_FILE} or from {WEIGHTS_FILE}") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != tuple(e["shape"]):
            raise CheckpointError(f"{d}: module {name} is {old} in the model built from {CONFIG_FILE}, "
                                  f"not an nn.Linear of shape {e['shape']}")
        try:
            packed = fam.quantizer.unpack(packed_t, {**e, "quantizer": e["family"]})
        except (ModuLoRAError, KeyError, ValueError) as err:
            raise CheckpointError(f"{d}: plugin {fam.plugin} cannot unpack module {name}: {err}") from err
        replace_linear(model, name, packed, fam.quantizer, lora=lcfg, bias=bias, chunk_rows=cr,
                       quantizer_name=e["quantizer"], plugin_version=fam.version)
    result = model.load_state_dict(tensors, strict=False, assign=True)
    if result.unexpected_keys:
        raise CheckpointError(f"{d / WEIGHTS_FILE} has tensors the model lacks: {result.unexpected_keys[:5]}")
    retie(model, index.get("tied", {}))
    check_no_meta(model, str(d / WEIGHTS_FILE))
    if (d / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(d)
    model.eval()  # as from_pretrained returns it
    e0 = next(iter(entries.values()))
    fam0 = families[next(iter(entries))]
    return finalize_model(model, ModuLoRAInfo(
        quantizer=e0["quantizer"], family=e0["family"], config=json.dumps(e0["config"], sort_keys=True),
        plugin=fam0.distribution or fam0.plugin, plugin_version=fam0.version,
        format_version=int(e0["format_version"]), lora=lcfg, chunk_rows=cr, modules=list(entries),
        base_model_name_or_path=index.get("base_model_name_or_path"),
    ))
