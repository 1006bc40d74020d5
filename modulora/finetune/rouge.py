"""ROUGE-1, ROUGE-2 and ROUGE-L F1 (Lin, 2004): n-gram and longest-common-subsequence overlap.

Tokens are the lower-cased alphanumeric runs of the text, as ``rouge-score`` computes without stemming;
scores are F1 in [0, 1] per pair, and :func:`corpus_rouge` averages them over pairs (x100).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

_TOKEN = re.compile(r"[a-z0-9]+")
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL")


def tokenize(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens: ``"Return a str()."`` -> ``["return", "a", "str"]``."""
    return _TOKEN.findall(text.lower())


def _f1(overlap: int, n_ref: int, n_hyp: int) -> float:
    if overlap == 0 or n_ref == 0 or n_hyp == 0:
        return 0.0
    p, r = overlap / n_hyp, overlap / n_ref
    return 2 * p * r / (p + r)


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def rouge_n(reference: Sequence[str], prediction: Sequence[str], n: int) -> float:
    """F1 of clipped n-gram overlap between two token lists."""
    ref, hyp = _ngrams(reference, n), _ngrams(prediction, n)
    return _f1(sum((ref & hyp).values()), sum(ref.values()), sum(hyp.values()))


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(reference: Sequence[str], prediction: Sequence[str]) -> float:
    """F1 of the longest common subsequence (sentence-level ROUGE-L)."""
    return _f1(lcs_length(reference, prediction), len(reference), len(prediction))


def rouge_scores(reference: str, prediction: str) -> dict[str, float]:
    """``{"rouge1", "rouge2", "rougeL"}`` F1 in [0, 1] for one reference/prediction pair."""
    ref, hyp = tokenize(reference), tokenize(prediction)
    return {"rouge1": rouge_n(ref, hyp, 1), "rouge2": rouge_n(ref, hyp, 2), "rougeL": rouge_l(ref, hyp)}


def corpus_rouge(references: Sequence[str], predictions: Sequence[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L F1 over pairs, x100 (the scale papers report)."""
    if len(references) != len(predictions):
        raise ValueError(f"{len(references)} references but {len(predictions)} predictions")
    if not references:
        return {k: 0.0 for k in ROUGE_KEYS}
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for ref, hyp in zip(references, predictions, strict=False):
        for k, v in rouge_scores(ref, hyp).items():
            totals[k] += v
    return {k: 100.0 * v / len(references) for k, v in totals.items()}
