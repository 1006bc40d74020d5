"""The built-in tasks, made from Python's own docstrings, and the user's data as a task.

- ``docsum``: a stdlib function's or class's signature and docstring body -> its one-line summary, scored
  with ROUGE-1/2/L (the analogue of the paper's SAMSum).
- ``docmodule``: a docstring -> which of eight stdlib modules it comes from, scored by accuracy (the
  analogue of the paper's classification tasks).
- ``--data FILE``: the user's examples; scored by validation loss (and perplexity).

Every split is deterministic (a hash of each docstring's first paragraph, so repeated text never crosses
splits), so numbers compare across runs and machines with the same Python version.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from modulora_core.errors import DataError

from .data import Docstring, Example, docstring_splits, read_examples, split_examples
from .rouge import corpus_rouge

MAX_INPUT_CHARS = 360  # docstring text per prompt: keeps prompt + answer near 128 tokens for SmolLM2
DOCMODULE_MODULES = ("ast", "codecs", "imaplib", "inspect", "logging", "mailbox", "pathlib", "tarfile")


@dataclass
class Task:
    """Examples per split plus how to score generated answers.

    ``metric`` is the headline key of :meth:`score` (None: the task is scored by loss only);
    ``max_new_tokens`` bounds generation when scoring.
    """

    name: str
    description: str
    splits: dict[str, list[Example]]
    metric: str | None = None
    metric_keys: tuple[str, ...] = ()
    max_new_tokens: int = 32
    higher_is_better: bool = True
    scorer: Callable[[list[str], list[str]], dict[str, float]] | None = field(default=None, repr=False)

    def examples(self, split: str) -> list[Example]:
        if split not in self.splits:
            raise DataError(f"task {self.name!r} has no {split!r} split; it has {sorted(self.splits)}")
        return self.splits[split]

    def score(self, predictions: list[str], references: list[str]) -> dict[str, float]:
        """``{metric: value}`` for generated ``predictions`` against ``references``."""
        if self.scorer is None:
            return {}
        return self.scorer(predictions, references)


def _clip(text: str, limit: int = MAX_INPUT_CHARS) -> str:
    """``text`` cut at a word boundary before ``limit`` characters."""
    text = text.strip()
    if len(text) <= limit:
        return text
    return text[:limit].rsplit(None, 1)[0] + " ..."


def _is_summary(d: Docstring) -> bool:
    s = d.summary_paragraph
    return bool(d.body) and 8 <= len(s) <= 160 and not s.endswith(":")


def docsum_example(d: Docstring) -> Example:
    prompt = ("Summarize this Python docstring in one line.\n\n"
              f"{d.qualname}{d.signature}\n{_clip(d.body)}")
    return Example(prompt, d.summary_paragraph)


def docmodule_example(d: Docstring, modules: tuple[str, ...] = DOCMODULE_MODULES) -> Example:
    prompt = ("Which Python standard-library module is this docstring from? Answer with one of: "
              f"{', '.join(modules)}.\n\n{_clip(d.doc)}")
    return Example(prompt, d.module)


def normalize_label(text: str) -> str:
    """A generated class label as comparable text: first line, lower-case, no quotes or final period."""
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    return re.sub(r"^[\s`'\"*]+|[\s`'\".*]+$", "", first).lower()


def accuracy(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Exact-match accuracy (x100) of normalized labels."""
    hits = sum(normalize_label(p) == r.lower() for p, r in zip(predictions, references, strict=False))
    return {"accuracy": 100.0 * hits / max(1, len(references))}


@cache
def _docstring_splits() -> dict[str, list[Docstring]]:
    return docstring_splits()


def docsum() -> Task:
    splits = {k: [docsum_example(d) for d in v if _is_summary(d)] for k, v in _docstring_splits().items()}
    return Task("docsum", "stdlib docstring body and signature -> its one-line summary (ROUGE)", splits,
                metric="rougeL", metric_keys=("rouge1", "rouge2", "rougeL"), max_new_tokens=40,
                scorer=corpus_rouge)


def docmodule() -> Task:
    splits = {k: [docmodule_example(d) for d in v if d.module in DOCMODULE_MODULES]
              for k, v in _docstring_splits().items()}
    return Task("docmodule", f"stdlib docstring -> which of {len(DOCMODULE_MODULES)} modules (accuracy)",
                splits, metric="accuracy", metric_keys=("accuracy",), max_new_tokens=8, scorer=accuracy)


TASKS = {"docsum": docsum, "docmodule": docmodule}


def get_task(name: str) -> Task:
    """A built-in task by name; :class:`DataError` lists the known ones."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}; built-in tasks: {', '.join(TASKS)} (or pass --data FILE)")
    return TASKS[name]()


def data_task(path: str | os.PathLike, val_frac: float = 0.1) -> Task:
    """The user's data as a task scored by validation loss; a split the data lacks is made by hash."""
    splits = read_examples(path)
    if not splits.get("validation"):
        made = split_examples(splits["train"], val_frac)
        splits = {**splits, **made}
    return Task(f"data:{os.fspath(path)}", f"examples from {os.fspath(path)} (validation loss)", splits)
