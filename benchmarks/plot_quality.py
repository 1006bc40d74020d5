"""The quality plot: held-out perplexity against storage bits per weight, one line per quantizer family.

Data: the raw rows that ``benchmarks.bench_quipsharp`` saves (``docs/data/quipsharp*.json``: quip#, optq,
nf4, rtn, hqq and bitsandbytes' NF4, all on one calibration set and one held-out text), the most complete
run when there are several (then the one with the most calibration tokens); GPTQModel's points come from ``benchmarks.bench_optq``
(``docs/data/optq*.json``: its own calibration set and held-out text, so they are reference markers, not a
line). ``benchmarks/plots.py`` calls :func:`quality_plot`.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from benchmarks.report import DATA, read_data

LINE_FAMILIES = ("quip#", "optq", "nf4", "hqq", "rtn")  # drawn as lines, in this legend order
MARKERS = {"quip#": "o", "optq": "s", "nf4": "D", "hqq": "^", "rtn": "v"}


def _payloads(prefix: str, data_dir: Path) -> list[dict]:
    return [p for f in sorted(data_dir.glob(f"{prefix}*.json")) if (p := read_data(f.stem, data_dir)) is not None]


def _completeness(payload: dict) -> tuple[int, int]:
    """(rows, calibration tokens): a run of every preset beats a partial one, then more calibration wins."""
    rows = payload.get("rows", [])
    return len(rows), max((int(r.get("calibration_tokens") or 0) for r in rows), default=0)


def quality_rows(data_dir: Path = DATA) -> tuple[list[dict], list[dict]]:
    """(rows of the chosen bench_quipsharp run, GPTQModel rows of the bench_optq run with the most of them)."""
    quip = _payloads("quipsharp", data_dir)
    main = max(quip, key=_completeness)["rows"] if quip else []
    # optq-ladder-quick's GPTQModel rows carry no bits per weight: only bench_optq's rows can be plotted
    optq = [[r for r in p.get("rows", []) if r.get("family") == "gptqmodel" and {"name", "bits_per_weight"} <= r.keys()]
            for p in _payloads("optq", data_dir)]
    return main, max(optq, key=len, default=[])


def _median_by_name(rows: list[dict]) -> list[tuple[float, float, str]]:
    """(bits per weight, median perplexity, name) per name: repeats over calibration sets collapse to one."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r["name"]].append(r)
    return sorted((statistics.median(float(r["bits_per_weight"]) for r in g),
                   statistics.median(float(r["perplexity"]) for r in g), n) for n, g in groups.items())


def quality_plot(out: Path, data_dir: Path = DATA) -> Path | None:
    """Draw perplexity (log scale) against bits per weight to ``out`` (PNG); None when no run saved data."""
    main, gptqmodel = quality_rows(data_dir)
    if not main and not gptqmodel:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in main:
        by_family[r["family"]].append(r)
    for fam in LINE_FAMILIES:
        if pts := _median_by_name(by_family.get(fam, [])):
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[fam], label=fam)
    if pts := _median_by_name(by_family.get("bitsandbytes", [])):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=160, color="black", zorder=3,
                   label="bitsandbytes NF4 (reference)")
    if pts := _median_by_name(gptqmodel):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="x", s=70, color="tab:red", zorder=3,
                   label="GPTQModel (bench_optq: its own held-out text)")
    for r in by_family.get("unquantized", [])[:1]:
        ax.axhline(float(r["perplexity"]), color="gray", linestyle="--", linewidth=1,
                   label=f"dense baseline, Q4_1 GGUF dequantized ({float(r['perplexity']):.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("storage bits per weight (packed tensors of the quantized linears)")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M: perplexity vs bits per weight")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out
