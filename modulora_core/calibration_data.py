"""Calibration data for quantizers that need input Hessians: whatever the user gives, as ``[n, seq_len]`` tokens.

Accepted: token tensors (a ``[n, t]`` tensor, a list of 1-D tensors or int lists, a dict or tokenizer output
with ``input_ids``), a 1-D tensor or text (a text file path, a list of strings) as one token stream cut
into consecutive windows, or a Hugging Face ``datasets`` dataset (an ``input_ids`` column: samples; a text
column: a stream). Samples are cut to ``seq_len``; one shorter than ``seq_len`` is an error, never padding.
"""

from __future__ import annotations

import itertools
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from .errors import CalibrationError

DEFAULT_N_SAMPLES = 128  # OPTQ's calibration size; with 512 tokens each, 65k tokens
DEFAULT_SEQ_LEN = 512  # GPTQ uses 2048; 512 keeps a CPU run of a small model to minutes


@dataclass(frozen=True)
class Calibration:
    """Calibration data plus how to use it; ``modulora.load(..., calibration=...)`` accepts it or bare data.

    ``n_samples`` / ``seq_len`` None: every given sample (at its own, common length), or for a stream
    ``DEFAULT_N_SAMPLES`` windows (fewer if the stream is shorter) of ``DEFAULT_SEQ_LEN`` tokens.
    ``true_sequential``: inside a block, quantize the linears stage by stage (q/k/v, o, gate/up, down), each
    stage's Hessians taken with the earlier stages already quantized. ``batch_size`` sequences per forward.
    ``tokenizer``: for text (default: the model's own, from its path or ``name_or_path``).
    """

    data: Any
    n_samples: int | None = None
    seq_len: int | None = None
    true_sequential: bool = True
    batch_size: int = 8
    tokenizer: Any = None
    text_column: str = "text"
    progress: bool = True


def is_hessian_dict(calibration: Any) -> bool:
    """True for ``{module name: X^T X}``: a mapping of names to square 2-D tensors (the older form)."""
    return (isinstance(calibration, Mapping) and bool(calibration) and "input_ids" not in calibration
            and all(isinstance(v, torch.Tensor) and v.dim() == 2 and v.shape[0] == v.shape[1]
                    for v in calibration.values()))


def resolve_calibration(quantizer: str, needs_calibration: bool, calibration: Any, n_samples: int | None,
                        seq_len: int | None) -> Mapping[str, torch.Tensor] | Calibration | None:
    """What ``modulora.load`` does with ``calibration``: None (not needed), Hessians, or a :class:`Calibration`."""
    if not needs_calibration:
        if calibration is not None:
            warnings.warn(f"quantizer {quantizer!r} needs no calibration; the calibration data is ignored",
                          stacklevel=3)
        return None
    if calibration is None:
        raise CalibrationError(
            f"quantizer {quantizer!r} needs calibration data: pass calibration= (token tensors, a text file, "
            f"a datasets dataset, or {{module name: X^T X}}) to modulora.load, or pick a quantizer that needs "
            f"none (e.g. an 'rtn-*' preset)")
    if is_hessian_dict(calibration):
        if n_samples is not None or seq_len is not None:
            warnings.warn("calibration is given as Hessians; n_samples and seq_len are ignored", stacklevel=3)
        return calibration
    if isinstance(calibration, Mapping) and "input_ids" not in calibration:
        if all(hasattr(v, "column_names") for v in calibration.values()):
            raise CalibrationError(f"calibration is a DatasetDict with splits {sorted(calibration)}; pass one "
                                   "split, e.g. calibration=ds['train']")
        raise CalibrationError("calibration dict must be {module name: X^T X [in, in] tensor} or tokenizer output "
                               f"with 'input_ids'; got keys {sorted(calibration)[:5]}")
    cal = calibration if isinstance(calibration, Calibration) else Calibration(calibration)
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if v is not None:
            cal = replace(cal, **{name: v})
    for name in ("n_samples", "seq_len", "batch_size"):
        v = getattr(cal, name)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise CalibrationError(f"calibration {name} must be a positive int, got {v!r}")
    return cal


def load_tokenizer(source: Any) -> Any:
    """``AutoTokenizer`` of a model path or id; a clear error when there is none."""
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(source))
    except Exception as e:  # noqa: BLE001 - missing files, unknown ids, no tokenizer in the directory
        raise CalibrationError(
            f"text calibration needs a tokenizer, and none loads from {source!r} ({type(e).__name__}: {e}); "
            "pass Calibration(data, tokenizer=...) or token tensors") from e


def calibration_tokens(cal: Calibration, tokenizer_source: Any = None) -> torch.Tensor:
    """``[n_samples, seq_len]`` int64 token ids from ``cal.data`` (see the module docstring)."""
    data = cal.data
    if isinstance(data, (str, os.PathLike)):
        path = Path(data)
        if not path.is_file():
            raise CalibrationError(f"calibration {str(data)!r} is not a file; give a text file path, token "
                                   "tensors, or a datasets dataset")
        return _windows(_tokenize([path.read_text(encoding="utf-8", errors="replace")], cal, tokenizer_source),
                        cal, f"text file {path}")
    if hasattr(data, "column_names") and not isinstance(data, torch.Tensor):
        return _from_dataset(data, cal, tokenizer_source)
    if isinstance(data, Mapping):
        data = data["input_ids"]
    if isinstance(data, torch.Tensor):
        if data.dim() == 1:
            return _windows(_check_ids(data, "calibration tensor"), cal, "the 1-D token tensor")
        if data.dim() != 2:
            raise CalibrationError(f"calibration tensor must be [n, seq_len] token ids (or 1-D, a token stream), "
                                   f"got shape {tuple(data.shape)}")
        return _samples(list(data), cal)
    if isinstance(data, (list, tuple)):
        if not data:
            raise CalibrationError("calibration is empty; give at least one sample")
        if all(isinstance(x, str) for x in data):
            return _windows(_tokenize(data, cal, tokenizer_source), cal, "the calibration texts")
        return _samples(list(data), cal)
    raise CalibrationError(f"cannot use a {type(data).__name__} as calibration data; give token tensors, a text "
                           "file path, a datasets dataset, or {module name: X^T X}")


def _check_ids(t: Any, what: str) -> torch.Tensor:
    t = torch.as_tensor(t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise CalibrationError(f"{what} must hold integer token ids, got dtype {t.dtype}")
    if t.numel() and int(t.min()) < 0:
        raise CalibrationError(f"{what} has negative token ids (min {int(t.min())}); token ids are >= 0")
    return t.to(torch.int64)


def _samples(items: list[Any], cal: Calibration) -> torch.Tensor:
    rows = []
    for i, x in enumerate(items):
        t = _check_ids(x, f"calibration sample {i}")
        if t.dim() == 2 and t.shape[0] == 1:
            t = t[0]
        if t.dim() != 1:
            raise CalibrationError(f"calibration sample {i} has shape {tuple(t.shape)}; each sample is a 1-D "
                                   "sequence of token ids")
        rows.append(t)
    if cal.n_samples is not None:
        if len(rows) < cal.n_samples:
            raise CalibrationError(f"calibration has {len(rows)} samples but n_samples={cal.n_samples} were "
                                   "requested; give more samples or lower n_samples")
        rows = rows[: cal.n_samples]
    lengths = sorted({len(r) for r in rows})
    if lengths[0] == 0:
        raise CalibrationError("calibration has an empty sample (0 tokens); drop it or give text")
    seq_len = cal.seq_len
    if seq_len is None:
        if len(lengths) > 1:
            raise CalibrationError(f"calibration samples have different lengths {lengths[:5]}...; pass "
                                   f"seq_len=<at most {lengths[0]}> to cut them to one length")
        seq_len = lengths[0]
    short = [(i, len(r)) for i, r in enumerate(rows) if len(r) < seq_len]
    if short:
        raise CalibrationError(f"{len(short)} calibration samples are shorter than seq_len={seq_len} (sample "
                               f"{short[0][0]} has {short[0][1]} tokens); give longer samples or lower seq_len")
    return torch.stack([r[:seq_len] for r in rows])


def _tokenize(texts: Iterable[str], cal: Calibration, tokenizer_source: Any, need: int | None = None) -> torch.Tensor:
    """One token stream from ``texts`` (joined by blank lines), stopping once ``need`` tokens are there."""
    tok = cal.tokenizer or (load_tokenizer(tokenizer_source) if tokenizer_source is not None else None)
    if tok is None:
        raise CalibrationError("text calibration needs a tokenizer: pass Calibration(data, tokenizer=...), or "
                               "load the model from a path that has one")
    ids: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise CalibrationError(f"calibration text {i} is a {type(text).__name__}, not a str")
        with warnings.catch_warnings():  # "sequence longer than the model's maximum": we cut windows
            warnings.simplefilter("ignore")
            ids.extend(tok(("\n\n" if i else "") + text, add_special_tokens=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    return torch.tensor(ids, dtype=torch.int64)


def _windows(stream: torch.Tensor, cal: Calibration, what: str) -> torch.Tensor:
    """Consecutive, non-overlapping ``seq_len`` windows of a 1-D token stream: ``[n, seq_len]``."""
    seq_len = cal.seq_len or DEFAULT_SEQ_LEN
    available = stream.numel() // seq_len
    if available == 0:
        raise CalibrationError(f"{what} gives {stream.numel()} tokens, fewer than one sequence of seq_len="
                               f"{seq_len}; give more text or lower seq_len")
    n = cal.n_samples if cal.n_samples is not None else min(available, DEFAULT_N_SAMPLES)
    if n > available:
        raise CalibrationError(f"{what} gives {stream.numel()} tokens: {available} sequences of seq_len={seq_len}, "
                               f"but n_samples={n} were requested; give more text or lower n_samples/seq_len")
    return stream[: n * seq_len].view(n, seq_len)


def _from_dataset(ds: Any, cal: Calibration, tokenizer_source: Any) -> torch.Tensor:
    cols = list(ds.column_names or [])
    if "input_ids" in cols:
        rows = [r["input_ids"] for r in itertools.islice(ds, cal.n_samples)]
        if not rows:
            raise CalibrationError("calibration dataset is empty; give at least one sample")
        return _samples(rows, cal)
    if cal.text_column not in cols:
        raise CalibrationError(f"calibration dataset has columns {cols}; it needs 'input_ids' or a text column "
                               f"(Calibration(ds, text_column=...), now {cal.text_column!r})")
    need = (cal.n_samples or DEFAULT_N_SAMPLES) * (cal.seq_len or DEFAULT_SEQ_LEN)
    stream = _tokenize((r[cal.text_column] for r in ds), cal, tokenizer_source, need=need)
    return _windows(stream, cal, f"dataset column {cal.text_column!r}")
