"""Real text every machine has offline: the docstrings of Python's own standard library.

Deterministic: a fixed module list, items sorted by qualified name, split by a hash of the name (so adding
a module never moves an existing item between splits).
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import warnings
from dataclasses import dataclass

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
                        if not mattr.startswith("_") and inspect.isfunction(meth):
                            _add(items, name, f"{name}.{attr}.{mattr}", meth, min_chars)
    return [items[k] for k in sorted(items)]


def _add(items: dict[str, Docstring], module: str, qualname: str, obj: object, min_chars: int) -> None:
    doc = inspect.getdoc(obj)
    if not doc or len(doc) < min_chars:
        return
    try:
        sig = str(inspect.signature(obj))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        sig = ""
    items[qualname] = Docstring(module, qualname, sig, doc)


def split_of(key: str, val_frac: float = 0.1, test_frac: float = 0.1) -> str:
    """``"train"``, ``"validation"`` or ``"test"`` from a stable hash of ``key``."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "test" if h < test_frac else "validation" if h < test_frac + val_frac else "train"


def docstring_splits(items: list[Docstring] | None = None) -> dict[str, list[Docstring]]:
    """The stdlib docstrings split deterministically into train / validation / test."""
    out: dict[str, list[Docstring]] = {"train": [], "validation": [], "test": []}
    for d in items if items is not None else stdlib_docstrings():
        out[split_of(d.qualname)].append(d)
    return out
