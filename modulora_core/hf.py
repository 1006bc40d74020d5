"""transformers integration: ``from_pretrained(..., quantization_config=ModuLoRAConfig("quip#-2bit"))``.

``ModuLoRAConfig`` and ``ModuLoRAHfQuantizer`` are registered with transformers' quantization registry as
method ``"modulora"`` when ``modulora_core`` is imported. Quantizing happens after the dense weights are
loaded (block-by-block calibration needs the whole model, as GPTQ's transformers integration does);
``save_pretrained`` writes the packed buffers as ordinary safetensors entries and the config records, per
module, the packed tensors' shapes and dtypes, so a later ``from_pretrained(dir)`` builds empty
QuantizedLinear shells before the weights load and never re-quantizes.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import warnings
from typing import Any

import torch
from torch import nn
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from . import integrity
from .errors import CheckpointError, UnknownQuantizerError
from .experts import unfuse_experts
from .layouts import is_quantizable, out_in, restore_layouts
from .qlinear import QuantizedLinear, iter_quantized_layers
from .quantizer import PackedWeight, QuantizerConfig, dtype_from_name, dtype_name
from .registry import Family, Preset, get_family, get_preset

METHOD = "modulora"
_UNSERIALIZED = ("calibration",)  # data, not settings: never written to config.json


def modulora_version() -> str:
    try:
        return md.version("modulora")
    except md.PackageNotFoundError:
        return "unknown"


class ModuLoRAConfig(QuantizationConfigMixin):
    """Which quantizer, which modules, and with what calibration: transformers' ``quantization_config``.

    ``preset``: a preset name (``"quip#-2bit"``), a plugin config object (``RTNConfig(bits=3)``) or a
    Preset. ``targets``: PEFT-style module selection (None = every linear of the decoder blocks,
    ``"all-linear"``, suffixes, or a regex); ``modules_to_not_convert``: suffixes left dense.
    ``calibration`` (tokens, text, a dataset, ``Calibration`` or ``{name: X^T X}``), ``n_samples`` and
    ``seq_len`` feed the block-by-block calibration of quantizers that need it; ``calibration`` is never
    serialized. ``modules`` is filled when a model is quantized: per module, what a reload needs to
    rebuild its packed buffers.
    """

    def __init__(self, preset: str | QuantizerConfig | Preset | None = None, *,
                 targets: list[str] | str | None = None, modules_to_not_convert: list[str] | None = None,
                 calibration: Any = None, n_samples: int | None = None, seq_len: int | None = None,
                 chunk_rows: int | None = None, quantizer_config: dict[str, Any] | None = None,
                 modules: dict[str, Any] | None = None, plugin: str | None = None,
                 plugin_version: str | None = None, format_version: int | None = None,
                 checksum: str | None = None, **kwargs: Any) -> None:
        self.quant_method = METHOD
        if preset is None and quantizer_config is None:
            raise UnknownQuantizerError("ModuLoRAConfig needs a preset, e.g. ModuLoRAConfig('rtn-4bit'); "
                                        "modulora.available_presets() lists the installed ones")
        # a user's preset is checked at once (did-you-mean); a saved config is bound when a model loads,
        # where a missing plugin is reported with the checkpoint's own record of it
        bq = _bind(preset, quantizer_config) if quantizer_config is None or not isinstance(preset, str) else None
        self.preset = bq.name if bq else preset
        self.quantizer_config = json.loads(bq.config.to_json()) if bq else dict(quantizer_config or {})
        self.targets = list(targets) if isinstance(targets, tuple) else targets
        self.modules_to_not_convert = list(modules_to_not_convert or [])
        self.calibration = calibration
        self.n_samples, self.seq_len, self.chunk_rows = n_samples, seq_len, chunk_rows
        self.modules = dict(modules or {})
        fam = get_family(bq.family) if bq else None
        self.plugin = plugin or (fam.distribution or fam.plugin if fam else None)
        self.plugin_version = plugin_version or (bq.version if bq else None)
        self.format_version = format_version or (bq.quantizer.format_version if bq else None)
        self.modulora_version = kwargs.pop("modulora_version", None) or modulora_version()
        self.checksum = checksum  # set at each save (integrity.py): ties this config to the saved weights
        kwargs.pop("quant_method", None)
        if kwargs:
            warnings.warn(f"ModuLoRAConfig ignores unknown settings {sorted(kwargs)}", stacklevel=2)

    @classmethod
    def from_preset(cls, bq: Preset, **kw: Any) -> ModuLoRAConfig:
        return cls(bq, **kw)

    @property
    def family(self) -> str:
        return self.quantizer_config.get("family", "")

    def bound(self) -> Preset:
        """The installed quantizer this config names (a clear error naming the plugin when absent)."""
        return _bind(self.preset, self.quantizer_config, checkpoint=self)

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k not in _UNSERIALIZED}
        return json.loads(json.dumps(d, default=str))

    def __repr__(self) -> str:
        return f"ModuLoRAConfig(preset={self.preset!r}, targets={self.targets!r}, modules={len(self.modules)})"


def _bind(preset: Any, quantizer_config: dict[str, Any] | None, checkpoint: ModuLoRAConfig | None = None
          ) -> Preset:
    if isinstance(preset, Preset):
        return preset
    if preset is not None and not (checkpoint is not None and quantizer_config):
        bq = get_preset(preset)  # did-you-mean error for an unknown name
        if not quantizer_config or json.loads(bq.config.to_json()) == quantizer_config:
            return bq
        # else a config object was given (preset is then its family's name): its settings win below
    family = (quantizer_config or {}).get("family")
    try:
        fam = get_family(family)
    except UnknownQuantizerError as err:
        dist = checkpoint.plugin if checkpoint is not None and checkpoint.plugin else None
        who = f"{dist} {checkpoint.plugin_version}" if dist else "a plugin"
        fix = f"pip install {dist}" if dist else "install the plugin that provides it"
        raise CheckpointError(f"this checkpoint was quantized with family {family!r} (preset {preset!r}) by "
                              f"{who}, which is not installed: {fix} ({err})") from None
    if checkpoint is not None:
        _check_versions(fam, checkpoint)
    cfg = fam.quantizer.config_class.from_json(quantizer_config)
    bq = get_preset(cfg)
    return Preset(preset or bq.name, bq.quantizer, bq.config, bq.plugin, bq.version)


def _major(v: str | None) -> int | None:
    m = re.match(r"(\d+)", v or "")
    return int(m.group(1)) if m else None


def _check_versions(fam: Family, qc: ModuLoRAConfig) -> None:
    dist = qc.plugin or fam.distribution or fam.plugin
    if qc.format_version is not None and int(qc.format_version) != fam.quantizer.format_version:
        raise CheckpointError(f"this checkpoint stores {fam.quantizer.name!r} format_version {qc.format_version} "
                              f"(written by {dist} {qc.plugin_version}) but the installed {dist} {fam.version} reads "
                              f"format_version {fam.quantizer.format_version}: pip install '{dist}=="
                              f"{qc.plugin_version}', or quantize the dense model again")
    saved, installed = _major(qc.plugin_version), _major(fam.version)
    if saved is not None and installed is not None and saved != installed:
        raise CheckpointError(f"this checkpoint was written by {dist} {qc.plugin_version} but {fam.version} is "
                              f"installed (another major version): pip install '{dist}=={qc.plugin_version}'")


def module_record(layer: QuantizedLinear) -> dict[str, Any]:
    """What a reload needs to rebuild ``layer``'s buffers on the meta device."""
    p = layer.packed
    rec = {"shape": list(p.shape), "dtype": dtype_name(p.dtype), "has_bias": layer.bias is not None,
           "extra": p.extra, "tensors": {k: [list(t.shape), dtype_name(t.dtype)] for k, t in p.tensors.items()}}
    if layer.source_layout != "linear":
        rec["source_layout"] = layer.source_layout
    return rec


def mark_quantized(model: nn.Module, qc: ModuLoRAConfig) -> nn.Module:
    """Record ``qc`` (with every QuantizedLinear of ``model``) as the model's quantization, the way
    ``from_pretrained`` leaves a quantized model, and freeze every parameter. Returns ``model``."""
    qc.modules = {n: module_record(m) for n, m in iter_quantized_layers(model)}
    if hasattr(model, "config"):
        model.config.quantization_config = qc
    if getattr(model, "hf_quantizer", None) is None or model.hf_quantizer.quantization_config is not qc:
        model.hf_quantizer = ModuLoRAHfQuantizer(qc, pre_quantized=True)
    model.is_quantized = True
    model.quantization_method = METHOD
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _torch_dtype(name: str) -> torch.dtype:
    try:
        return dtype_from_name(name)
    except Exception:  # noqa: BLE001 - integer storage dtypes are not in the float table
        return getattr(torch, name)


class ModuLoRAHfQuantizer(HfQuantizer):
    """transformers' side of ModuLoRA: quantize after loading, or rebuild packed shells before loading."""

    requires_calibration = False

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        self.bq = self.quantization_config.bound() if self.pre_quantized else _bind(
            self.quantization_config.preset, self.quantization_config.quantizer_config)

    def _process_model_before_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qc: ModuLoRAConfig = self.quantization_config
        if not self.pre_quantized:
            return model
        if not qc.modules:
            raise CheckpointError("this checkpoint's quantization_config lists no quantized modules; it was not "
                                  "saved from a ModuLoRA model")
        # a hand-edited config.json must not decode the packed weights differently: refused before they load
        integrity.verify_config(qc.to_dict(), getattr(model, "name_or_path", None))
        bq = self.bq
        unfuse_experts(model)  # as quantize_model did: the checkpoint holds one entry per expert matrix
        for name, rec in qc.modules.items():
            try:
                old = model.get_submodule(name)
            except AttributeError:
                raise CheckpointError(f"quantized module {name} is not in the {type(model).__name__} built from "
                                      f"this config") from None
            tensors = {k: torch.empty(shape, dtype=_torch_dtype(dt), device="meta")
                       for k, (shape, dt) in rec["tensors"].items()}
            packed = PackedWeight(bq.family, bq.config, tuple(rec["shape"]), dtype_from_name(rec["dtype"]),
                                  tensors, int(qc.format_version or bq.quantizer.format_version),
                                  dict(rec.get("extra", {})))
            bias = torch.empty(packed.shape[0], device="meta", dtype=packed.dtype) if rec["has_bias"] else None
            parent, _, leaf = name.rpartition(".")
            if not is_quantizable(old) or out_in(old) != packed.shape:
                raise CheckpointError(f"quantized module {name} is {old} in the model built from the config, "
                                      f"not a linear of shape {list(packed.shape)}")
            setattr(model.get_submodule(parent) if parent else model, leaf, QuantizedLinear(
                packed, bq.quantizer, bias=bias, chunk_rows=qc.chunk_rows, preset=bq.name,
                plugin_version=bq.version, source_layout=rec.get("source_layout", "linear")))
        return model

    def _process_model_after_weight_loading(self, model: nn.Module, **kwargs: Any) -> nn.Module:
        qc: ModuLoRAConfig = self.quantization_config
        if self.pre_quantized:  # the packed tensors as saved, checked against config.json's checksum
            integrity.verify_tensors(model, qc.to_dict(), getattr(model, "name_or_path", None))
        else:
            from .surgery import QuantizeOptions, quantize_model

            integrity.check_finite(model, f"the model {getattr(model, 'name_or_path', '')}".rstrip())
            quantize_model(model, self.bq, QuantizeOptions(
                targets=qc.targets, skip=tuple(qc.modules_to_not_convert), calibration=qc.calibration,
                n_samples=qc.n_samples, seq_len=qc.seq_len, chunk_rows=qc.chunk_rows),
                source=getattr(model, "name_or_path", None))
            qc.calibration = None  # data, not config: do not keep it alive on the model
        mark_quantized(model, qc)
        return model

    def get_state_dict_and_metadata(self, model: nn.Module) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """The base's own state dict. Under PEFT layers (``get_peft_model`` wraps modules in place) the
        adapters are left out and ``<module>.base_layer.<x>`` is saved as ``<module>.<x>``, so saving the
        model inside a PeftModel writes the quantized base that ``from_pretrained`` expects."""
        # save_pretrained calls this before it writes config.json: the checksum set here lands in both
        qc: ModuLoRAConfig = self.quantization_config
        record = integrity.decoding_record(qc.to_dict())
        qc.checksum = integrity.checksum(record, integrity.quantized_tensors(model))
        meta = {integrity.CHECKSUM_KEY: qc.checksum, integrity.RECORD_KEY: json.dumps(record, sort_keys=True)}
        state = model.state_dict()
        if not any(".base_layer." in k for k in state):
            return None, meta
        adapter = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")
        return {k.replace(".base_layer.", "."): v for k, v in state.items() if not adapter.search(k)}, meta

    @property
    def is_trainable(self) -> bool:
        return True

    def is_serializable(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def _dequantize(self, model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
        for name, layer in list(iter_quantized_layers(model)):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, layer.to_dense(dtype))
        return restore_layouts(model)


def register() -> None:
    """Register method ``"modulora"`` with transformers (idempotent)."""
    if AUTO_QUANTIZATION_CONFIG_MAPPING.get(METHOD) is not ModuLoRAConfig:
        AUTO_QUANTIZATION_CONFIG_MAPPING.pop(METHOD, None)
        register_quantization_config(METHOD)(ModuLoRAConfig)
    if AUTO_QUANTIZER_MAPPING.get(METHOD) is not ModuLoRAHfQuantizer:
        AUTO_QUANTIZER_MAPPING.pop(METHOD, None)
        register_quantizer(METHOD)(ModuLoRAHfQuantizer)
