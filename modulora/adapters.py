"""Adapters on a ModuLoRA base: PEFT's own format, plus a record of the base they were trained on.

An adapter directory is exactly what ``PeftModel.save_pretrained`` writes (``adapter_config.json`` +
``adapter_model.safetensors``; stock PEFT loads it), plus ``modulora_config.json`` (PEFT drops unknown keys
from its own config, so ours live apart): the quantizer the adapter was trained on and a fingerprint of
the base model, which :func:`load_adapter` checks before PEFT loads the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from modulora_core import AdapterError, iter_quantized_layers
from modulora_core.checkpoint import unwrap_peft
from modulora_core.files import read_json, remove_stale_stages, staged_writes, tensors_digest, write_json
from modulora_core.hf import modulora_version
from modulora_core.integrity import nonfinite

if TYPE_CHECKING:
    from peft import PeftModel

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MODULORA_CONFIG = "modulora_config.json"
_ADAPTER_KEY = re.compile(r"\.(lora_[A-Za-z_]+|lora_magnitude_vector)\.")  # PEFT's tensors, not the base's
_FINGERPRINT_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "vocab_size")


def _clean(name: str) -> str:
    return name.removesuffix(".base_layer")


def base_fingerprint(model: nn.Module) -> dict[str, Any]:
    """What identifies the base an adapter fits: config sizes, the quantized modules' ``[out, in]``, and
    digests of its weights (:func:`base_digests`)."""
    base = unwrap_peft(model)
    cfg = getattr(base, "config", None)
    fp: dict[str, Any] = {k: getattr(cfg, k, None) for k in _FINGERPRINT_KEYS}
    fp["modules"] = {_clean(n): [m.out_features, m.in_features] for n, m in iter_quantized_layers(base)}
    fp.update(base_digests(model))
    fp["name_or_path"] = str(getattr(base, "name_or_path", "") or "")
    return fp


def base_digests(model: nn.Module) -> dict[str, str]:
    """SHA-256 of the base's weights (``weights_sha256``: every tensor, packed ones as stored) and of its
    unquantized part alone (``dense_sha256``: embeddings, norms, dense linears; the same for every quantizer
    of one model). Two models with the same shapes differ here. Cached on the model until a tensor changes."""
    base = unwrap_peft(model)
    state = {_clean_key(k): t for k, t in base.state_dict().items() if not _ADAPTER_KEY.search(k)}
    key = tuple((k, t.data_ptr(), t._version) for k, t in sorted(state.items()))
    cached = getattr(base, "_modulora_digests", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    packed = {_clean(n) for n, _ in iter_quantized_layers(base)}
    dense = {k: t for k, t in state.items() if k.rpartition(".")[0] not in packed}
    digests = {"weights_sha256": tensors_digest(state), "dense_sha256": tensors_digest(dense)}
    base._modulora_digests = (key, digests)
    return digests


def _clean_key(key: str) -> str:
    return key.replace(".base_layer.", ".")


def quantizer_record(model: nn.Module) -> dict[str, Any]:
    """The preset, family and config of the model's quantized layers (they share one)."""
    layers = [m for _, m in iter_quantized_layers(unwrap_peft(model))]
    if not layers:
        raise AdapterError("model has no quantized layers; create it with modulora.load(model, preset)")
    m = layers[0].quant_metadata()
    return {"quantizer": layers[0].preset, "family": m["family"], "config": m["config"],
            "plugin_version": m["plugin_version"], "format_version": m["format_version"]}


def save_adapter(model: PeftModel, directory: str | os.PathLike, **kwargs: Any) -> Path:
    """``model.save_pretrained(directory)`` plus ``modulora_config.json``; staged, then moved into place."""
    if not hasattr(model, "peft_config"):
        raise AdapterError(f"save_adapter takes a PeftModel (from modulora.load or peft.get_peft_model), got a "
                           f"{type(model).__name__}; a model without adapters is saved with save_quantized")
    bad = nonfinite((n, p) for n, p in model.named_parameters() if p.requires_grad)
    if bad:
        raise AdapterError(f"the adapter has NaN/inf values ({', '.join(f'{n}: {c}' for n, c in bad[:3])}); it "
                           f"was not saved. Training diverged: lower --lr, or check the data and the base")
    ours = {"modulora_version": modulora_version(), **quantizer_record(model),
            "base_model": base_fingerprint(model)}
    with staged_writes(directory, last=(ADAPTER_CONFIG,)) as stage:
        model.save_pretrained(str(stage), **kwargs)
        write_json(stage / MODULORA_CONFIG, ours)
    return Path(directory)


def check_adapter(model: nn.Module, directory: str | os.PathLike, *, allow_other_quantizer: bool = False) -> None:
    """Raise :class:`AdapterError` unless the adapter in ``directory`` was made for this base and quantizer."""
    d = Path(directory)
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not (d / f).is_file()]
    if missing:
        raise AdapterError(f"{d} lacks {missing}; an adapter directory holds {ADAPTER_CONFIG} and "
                           f"{ADAPTER_WEIGHTS} (as PeftModel.save_pretrained writes them)")
    if not (d / MODULORA_CONFIG).is_file():
        return  # an adapter PEFT wrote on its own: PEFT checks the shapes
    ours = read_json(d / MODULORA_CONFIG, AdapterError)
    want, have = ours.get("base_model", {}), base_fingerprint(model)
    diff = [k for k in _FINGERPRINT_KEYS if k in want and want[k] != have[k]]
    if diff or ("modules" in want and want["modules"] != have["modules"]):
        what = {k: (want[k], have[k]) for k in diff} or "the quantized modules or their shapes differ"
        raise AdapterError(f"adapter {d} was made for another base model ({want.get('model_type')}) than "
                           f"this one ({have['model_type']}): (adapter's, model's) = {what}")
    q = quantizer_record(model)
    other_q = (ours.get("family"), ours.get("config")) != (q["family"], q["config"])
    if not allow_other_quantizer and other_q:
        raise AdapterError(f"adapter {d} was trained on quantizer {ours.get('quantizer')!r} "
                           f"({json.dumps(ours.get('config'))}) but this model uses {q['quantizer']!r} "
                           f"({json.dumps(q['config'])}); load it onto a base quantized with "
                           f"{ours.get('quantizer')!r} (from Python, load_adapter(..., allow_other_quantizer=True) "
                           f"loads it anyway)")
    digest = "dense_sha256" if allow_other_quantizer and other_q else "weights_sha256"
    if digest in want and want[digest] != have[digest]:
        raise AdapterError(f"adapter {d} was trained on another base: the shapes match but the weights differ "
                           f"(the adapter's base: {want.get('name_or_path') or 'unnamed'}; this one: "
                           f"{have['name_or_path'] or 'unnamed'}). Load it onto the base it was trained on")


def load_adapter(model: nn.Module, directory: str | os.PathLike, *, adapter_name: str = "default",
                 is_trainable: bool = False, allow_other_quantizer: bool = False) -> PeftModel:
    """Load a PEFT adapter onto a quantized base (or add it to a PeftModel), after :func:`check_adapter`.

    Returns the PeftModel (``PeftModel.from_pretrained``, or the same PeftModel with one more adapter).
    """
    from peft import PeftModel

    remove_stale_stages(directory)  # what a killed save left behind
    check_adapter(model, directory, allow_other_quantizer=allow_other_quantizer)
    with peft_errors(directory):
        if hasattr(model, "peft_config"):
            model.load_adapter(str(directory), adapter_name=adapter_name, is_trainable=is_trainable)
            return model
        return PeftModel.from_pretrained(model, str(directory), adapter_name=adapter_name,
                                         is_trainable=is_trainable)


@contextlib.contextmanager
def peft_errors(directory: str | os.PathLike) -> Iterator[None]:
    """PEFT's errors while loading the adapter in ``directory`` as :class:`AdapterError` naming it: a
    truncated weights file, or an adapter whose tensors do not fit the model (PEFT's size mismatch)."""
    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as e:  # its message names neither the file nor the fix
        raise AdapterError(f"cannot read {Path(directory) / ADAPTER_WEIGHTS} ({e}): the file is truncated or "
                           f"corrupted; save the adapter again") from e
    except RuntimeError as e:
        if "size mismatch" not in str(e):
            raise
        first = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln and "copying" in ln),
                     str(e).splitlines()[0])
        raise AdapterError(f"adapter {directory} does not fit this model ({first}); it was trained on another "
                           f"base model: load it onto that one") from None
