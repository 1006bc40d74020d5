"""Checks that refuse bad input before any work, each with an error that says what is wrong and what would
be right: a ``--model`` that does not exist (refused at once, offline: no model hub is tried), a directory
that is not a model, a model that is not a causal LM, and an ``--out`` that holds another run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from modulora_core.checkpoint import CONFIG_FILE, LEGACY_INDEX, LEGACY_WEIGHTS
from modulora_core.errors import ModuLoRAError

from .console import say
from .train_config import RUN_CONFIG

MODEL_HINT = ("pass a Hugging Face model directory (config.json, the weights *.safetensors and the tokenizer "
              "files), a quantized base (`modulora quantize`, or a finetune's OUT/base), or omit --model for "
              "SmolLM2-135M-Instruct")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth")
RUN_FILES = (RUN_CONFIG, "metrics.json")
RUN_DIRS = ("checkpoints", "adapter", "base")


def hub_allowed() -> bool:
    """The model hub is tried only when the user asks for it with ``HF_HUB_OFFLINE=0``."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no")


def model_location(model: str, what: str = "--model") -> str:
    """``model`` as a local model directory, checked; a model id is looked up in the local Hugging Face
    cache only. Nothing is fetched unless ``HF_HUB_OFFLINE=0`` (then an id not cached is returned as it is)."""
    p = Path(model).expanduser()
    if p.is_dir():
        check_model_dir(p, what)
        return str(p)
    if p.exists():
        raise ModuLoRAError(f"{what} {model} is a file, not a model directory; {MODEL_HINT}")
    if not _REPO_ID.match(model):  # a path (absolute, ./x, a/b/c, ...): no hub id looks like this
        raise ModuLoRAError(f"{what} {model} does not exist; {MODEL_HINT}")
    cached = _cached_snapshot(model)
    if cached is not None:
        return cached
    if hub_allowed():
        return model
    raise ModuLoRAError(f"{what} {model}: no such directory, and no model {model!r} in the local Hugging Face "
                        f"cache. ModuLoRA runs offline: pass a model directory, or download it once "
                        f"(`hf download {model}`); HF_HUB_OFFLINE=0 lets it fetch from the Hub")


def _cached_snapshot(repo_id: str) -> str | None:
    """The local snapshot directory of ``repo_id`` when the Hugging Face cache holds its config (no network)."""
    if "/" not in repo_id:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, CONFIG_FILE)
    return str(Path(found).parent) if isinstance(found, str) else None


def check_model_dir(d: Path, what: str = "--model") -> None:
    """Raise unless ``d`` holds a model: a config, weights, and (for a checkpoint in shards) their index."""
    if (d / LEGACY_WEIGHTS).is_file() and not (d / LEGACY_INDEX).is_file():
        raise ModuLoRAError(f"{what} {d}: {LEGACY_WEIGHTS} is there but its index {LEGACY_INDEX} is missing "
                            f"(deleted?); restore it, or quantize the dense model again")
    if not (d / CONFIG_FILE).is_file():
        adapter = " It is an adapter directory: pass it as --adapter, and its base as --model." if (
            d / "adapter_config.json").is_file() else ""
        raise ModuLoRAError(f"{what} {d} is not a model directory: it has no {CONFIG_FILE}.{adapter} To fix: {MODEL_HINT}")
    shards = sorted(d.glob("*-of-*.safetensors"))
    if shards and not any(d.glob("*.safetensors.index.json")):
        raise ModuLoRAError(f"{what} {d}: the weights are in shards ({shards[0].name}, ...) but their index "
                            f"(model.safetensors.index.json) is missing (deleted?); restore it or save the model "
                            f"again")
    if not any(any(d.glob(pat)) for pat in WEIGHT_PATTERNS):
        raise ModuLoRAError(f"{what} {d} has {CONFIG_FILE} but no weights (*.safetensors); {MODEL_HINT}")
    check_causal_lm(d)


def check_causal_lm(d: str | Path) -> None:
    """Raise unless the config in ``d`` names a causal LM: anything else (a ``BertModel``) would get a
    randomly initialised LM head from ``AutoModelForCausalLM`` and train on noise."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = json.loads((Path(d) / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return  # not a local directory with a config: transformers reports it
    archs = config.get("architectures") or []
    causal = {a for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for a in ([v] if isinstance(v, str) else v)}
    if archs and not any(a in causal or a.endswith("ForCausalLM") for a in archs):
        raise ModuLoRAError(f"{d} is a {', '.join(archs)} (model_type {config.get('model_type')!r}), not a causal "
                            f"language model: it has no trained LM head to finetune. Pass a causal LM (its "
                            f"config.json architectures end in ForCausalLM or LMHeadModel, e.g. LlamaForCausalLM)")


def check_loaded_weights(model: Any, missing: list[str], where: str) -> None:
    """Raise when loading left weights randomly initialised (``missing`` keys not tied to another tensor)."""
    tied = set()
    out, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and emb is not None and out.weight is emb.weight:
        tied = {n for n, p in model.named_parameters(remove_duplicate=False) if p is emb.weight}
    random = [k for k in missing if k not in tied]
    if random:
        raise ModuLoRAError(f"{where} lacks weights the model needs: {random[:5]}; transformers would initialise "
                            f"them at random. Pass a complete checkpoint of a causal LM")


def holds_run(out: Path) -> list[str]:
    """What of an earlier ``modulora finetune`` run ``out`` holds (empty: nothing)."""
    return [f for f in RUN_FILES if (out / f).exists()] + [
        f"{d}/" for d in RUN_DIRS if (out / d).is_dir() and any((out / d).iterdir())]


def clear_run(out: Path, keep: str | None = None) -> None:
    """Remove an earlier run from ``out`` (``--overwrite``); refuse when ``keep`` (the model of the new run)
    lies inside what would be removed."""
    found = holds_run(out)
    if keep is not None and Path(keep).exists():
        k = Path(keep).resolve()
        for d in RUN_DIRS:
            if k == (out / d).resolve() or (out / d).resolve() in k.parents:
                raise ModuLoRAError(f"--overwrite would delete {out / d}, which is this run's --model; copy it "
                                    f"elsewhere first, or pass another --out")
    say(f"[yellow]--overwrite: removing the earlier run in {out} ({', '.join(found)})[/]")
    for f in RUN_FILES:
        (out / f).unlink(missing_ok=True)
    for d in RUN_DIRS:
        shutil.rmtree(out / d, ignore_errors=True)
