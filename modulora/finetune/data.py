"""Training data: the docstrings of Python's own standard library, and the user's own files.

Stdlib docstrings are real text every machine has offline. Deterministic: a fixed module list, items
sorted by qualified name, split by a hash of the docstring's first paragraph (so adding a module never moves
an existing item between splits, and text that repeats, such as the docstrings ``inspect.getdoc`` inherits
from a base class, always lands in one split: no validation or test answer is a training answer). User data (``--data``) is read into :class:`Example` records: jsonl, json, csv, txt, or a
directory written by ``datasets.Dataset.save_to_disk``; each record is instruction/input/output,
prompt/completion, or plain text.
"""

from __future__ import annotations

import csv
import hashlib
import importlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modulora_core.errors import DataError

# Pure-Python modules with substantial docstrings that import on every platform without side effects.
STDLIB_MODULES = (
    "argparse", "ast", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections",
    "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal",
    "difflib", "email", "enum", "filecmp", "fnmatch", "fractions", "ftplib", "functools", "getopt",
    "gettext", "glob", "gzip", "hashlib", "heapq", "hmac", "html", "http.client", "imaplib", "inspect",
    "ipaddress", "itertools", "json", "logging", "mailbox", "mimetypes", "numbers", "operator", "optparse",
    "os", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint", "queue", "quopri",
    "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil", "smtplib", "socket",
    "socketserver", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "trace", "traceback", "typing", "unittest", "urllib.parse",
    "urllib.request", "uuid", "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zipimport",
)


@dataclass(frozen=True)
class Docstring:
    """One documented object: ``qualname`` like ``json.dumps``, its signature (may be empty) and docstring."""

    module: str
    qualname: str
    signature: str
    doc: str

    @property
    def summary(self) -> str:
        """The first line of the docstring."""
        return self.doc.strip().splitlines()[0].strip()

    @property
    def summary_paragraph(self) -> str:
        """The docstring's first paragraph on one line (summaries sometimes wrap over two lines)."""
        return " ".join(self.doc.strip().split("\n\n", 1)[0].split())

    @property
    def body(self) -> str:
        """The docstring after its first paragraph (may be empty)."""
        parts = self.doc.strip().split("\n\n", 1)
        return parts[1].strip() if len(parts) > 1 else ""


def stdlib_docstrings(modules: tuple[str, ...] = STDLIB_MODULES, min_chars: int = 40) -> list[Docstring]:
    """Public functions, classes and methods of ``modules`` with a docstring of at least ``min_chars``."""
    items: dict[str, Docstring] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in modules:
            try:
                mod = importlib.import_module(name)
            except Exception:  # noqa: BLE001 - a platform without this module just contributes nothing
                continue
            for attr, obj in sorted(vars(mod).items()):
                if attr.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                    continue
                if not (inspect.isfunction(obj) or inspect.isclass(obj)):
                    continue
                _add(items, name, f"{name}.{attr}", obj, min_chars)
                if inspect.isclass(obj):
                    for mattr, meth in sorted(vars(obj).items()):
                        # only the module's own methods: libraries patch stdlib classes when imported
                        # (transformers adds logging.Logger.warning_once), which would make the data
                        # depend on what the process imported before
                        if (not mattr.startswith("_") and inspect.isfunction(meth)
                                and meth.__module__ == mod.__name__):
                            _add(items, name, f"{name}.{attr}.{mattr}", meth, min_chars)
    return [items[k] for k in sorted(items)]


def _add(items: dict[str, Docstring], module: str, qualname: str, obj: object, min_chars: int) -> None:
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < min_chars:
        return
    try:
        sig = _stable_signature(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        sig = ""
    items[qualname] = Docstring(module, qualname, sig, doc)


def _stable_signature(sig: inspect.Signature) -> str:
    """``str(sig)`` with every default whose repr names a memory address (``<... at 0x7f...>``, e.g.
    ``logging.shutdown``'s live handler list) shown as ``...``: the text must be the same in every process."""
    params = []
    for p in sig.parameters.values():
        if p.default is not inspect.Parameter.empty and " at 0x" in repr(p.default):
            p = p.replace(default=_Elided())
        params.append(p)
    return str(sig.replace(parameters=params))


class _Elided:
    def __repr__(self) -> str:
        return "..."


def split_of(key: str, val_frac: float = 0.1, test_frac: float = 0.1) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` from a stable hash of ``key``."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_frac else "validation" if h < test_frac + val_frac else "train"


def docstring_splits(items: list[Docstring] | None = None) -> dict[str, list[Docstring]]:
    """The stdlib docstrings split deterministically into train / validation / test, keyed by text.

    The key is the docstring's first paragraph (docsum's answer), not the name: ``inspect.getdoc`` returns a
    base class's docstring for an undocumented override, and split by name 21 of 158 test docstrings were
    text-identical to training ones. Equal texts have equal first paragraphs, so they share a split too.
    """
    out: dict[str, list[Docstring]] = {"train": [], "validation": [], "test": []}
    for d in items if items is not None else stdlib_docstrings():
        out[split_of(d.summary_paragraph)].append(d)
    return out


# -- the user's own data ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Example:
    """One training/evaluation example. ``prompt=None``: plain text, the loss covers every token; else the
    model sees ``prompt`` (in the chat template when the tokenizer has one) and learns ``completion``."""

    prompt: str | None
    completion: str


DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")
_FORMATS = "instruction/input/output, prompt/completion, or text"


def read_examples(path: str | os.PathLike) -> dict[str, list[Example]]:
    """``{split: examples}`` from a data file or a saved ``datasets`` dataset; at least ``"train"``.

    A file gives ``{"train": ...}``; a json object ``{"train": [...], "validation": [...]}`` or a
    ``DatasetDict`` directory gives its splits. Raises :class:`DataError` naming the file (and line).
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist; pass a .jsonl, .json, .csv or .txt file, or a "
                        f"directory saved with datasets' save_to_disk")
    if p.is_dir():
        splits = _read_datasets_dir(p)
    elif p.suffix.lower() == ".jsonl":
        splits = {"train": _read_jsonl(p)}
    elif p.suffix.lower() == ".json":
        splits = _read_json(p)
    elif p.suffix.lower() == ".csv":
        with _open(p) as f:
            splits = {"train": list(csv.DictReader(f))}
    elif p.suffix.lower() == ".txt":
        with _open(p) as f:
            splits = {"train": [{"text": t.strip()} for t in f.read().split("\n\n") if t.strip()]}
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r}; use one of {', '.join(DATA_SUFFIXES)} or a "
                        f"datasets directory")
    out = {split: [to_example(r, f"{p} ({split}) record {i + 1}") for i, r in enumerate(records)]
           for split, records in splits.items()}
    if not out.get("train"):
        raise DataError(f"{p} has no training examples; it is empty (or has no 'train' split)")
    return out


def _open(p: Path) -> Any:
    try:
        return p.open(encoding="utf-8", newline="")
    except OSError as e:
        raise DataError(f"cannot read data file {p}: {e}") from e


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    records = []
    with _open(p) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except ValueError as e:
                raise DataError(f"{p}, line {n}: not valid JSON ({e}); each line must be one JSON object "
                                f"such as {{\"prompt\": ..., \"completion\": ...}}") from None
    return records


def _read_json(p: Path) -> dict[str, list[Any]]:
    with _open(p) as f:
        try:
            data = json.load(f)
        except ValueError as e:
            raise DataError(f"{p}: not valid JSON ({e})") from None
    if isinstance(data, list):
        return {"train": data}
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()) and "train" in data:
        return data
    raise DataError(f"{p}: expected a JSON list of records or {{\"train\": [...], \"validation\": [...]}}")


def _read_datasets_dir(p: Path) -> dict[str, list[Any]]:
    try:
        import datasets
    except ImportError as e:
        raise DataError(f"{p} is a directory: reading a saved `datasets` dataset needs the datasets "
                        f"package (pip install datasets), or pass a .jsonl/.json/.csv/.txt file") from e
    try:
        ds = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{p} is not a dataset saved with save_to_disk: {e}") from e
    if isinstance(ds, datasets.DatasetDict):
        return {k: list(v) for k, v in ds.items()}
    return {"train": list(ds)}


def to_example(record: Any, where: str) -> Example:
    """An :class:`Example` from one record in any of the supported layouts; ``where`` names it in errors."""
    if isinstance(record, str):
        record = {"text": record}
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with {_FORMATS} fields, got {type(record).__name__}")
    r = {k: v for k, v in record.items() if v is not None}
    if "instruction" in r and "output" in r:
        prompt = str(r["instruction"]).strip()
        if str(r.get("input", "")).strip():
            prompt += "\n\n" + str(r["input"]).strip()
        return _checked(Example(prompt, str(r["output"]).strip()), where)
    if "prompt" in r and "completion" in r:
        return _checked(Example(str(r["prompt"]).strip(), str(r["completion"]).strip()), where)
    if "text" in r:
        return _checked(Example(None, str(r["text"])), where)
    nulls = [k for k in ("instruction", "output", "prompt", "completion", "text") if k in record and k not in r]
    if nulls:
        raise DataError(f"{where}: {', '.join(repr(k) for k in nulls)} is null; give each a string, or drop the "
                        f"record")
    raise DataError(f"{where} has fields {sorted(record)}; expected {_FORMATS}")


def _checked(ex: Example, where: str) -> Example:
    if not ex.completion.strip():
        raise DataError(f"{where}: the output/completion/text is empty")
    return ex


def split_examples(examples: list[Example], val_frac: float = 0.1) -> dict[str, list[Example]]:
    """Train/validation split by a stable hash of each example's text (deterministic across runs)."""
    out: dict[str, list[Example]] = {"train": [], "validation": []}
    for ex in examples:
        key = f"{ex.prompt}\x00{ex.completion}"
        out["validation" if split_of(key, val_frac, 0.0) == "validation" else "train"].append(ex)
    if not out["validation"] and len(out["train"]) > 1:  # tiny data: hold out one example
        out["validation"].append(out["train"].pop())
    return out
