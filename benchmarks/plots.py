"""Draw the report's figures (docs/img/*.png) from the raw results in docs/data/*.json.

Each figure is drawn only when its data exists: run the benchmark first (``python -m benchmarks.run`` runs
them all, then this). A full run's data is preferred to a ``--quick`` one's.

    python -m benchmarks.plots

Figures: memory (measured and predicted peak vs. model parameters, per kind of configuration), speed
(forward+backward time relative to dense LoRA, per path; materialize throughput against a memory copy),
finetune (validation loss and ROUGE-L before/after), quality (drawn by ``benchmarks/plot_quality.py``).
The section ``figures`` of docs/benchmarks.md embeds them.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a server
import matplotlib.pyplot as plt  # noqa: E402

from benchmarks.report import DATA, IMG, REPORT, read_data, write_section  # noqa: E402

GiB = 1 << 30


def _save(fig: Any, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def memory_plot(data: dict, out: Path) -> Path | None:
    """Measured (solid) and predicted (dashed) peak GiB vs. model parameters, one colour per kind (ModuLoRA
    n-bit, dense LoRA, QLoRA). Only rows without checkpointing or chunking: one setting per model."""
    rows = [r for r in data.get("rows", []) if not r.get("checkpointing") and not r.get("chunk_rows")]
    if not rows:
        return None
    kinds = sorted({r["kind"] for r in rows}, key=lambda k: (not k.startswith("ModuLoRA"), k))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, kind in enumerate(kinds):
        pts = sorted((r["params"], r["measured"] / GiB, r["predicted"] / GiB) for r in rows if r["kind"] == kind)
        x = [p[0] / 1e9 for p in pts]
        ax.plot(x, [p[1] for p in pts], "o-", color=f"C{i}", label=kind)
        ax.plot(x, [p[2] for p in pts], "x--", color=f"C{i}")
    # one legend entry per kind (colour), and two for the line styles
    ax.plot([], [], "ko-", label="measured peak RSS")
    ax.plot([], [], "kx--", label="predicted (modulora plan)")
    # each model ran at its own batch and sequence length: say which under its tick
    setting = {r["params"]: f"{r.get('batch', '?')}×{r.get('seq', '?')}" for r in rows}
    ticks = sorted(setting)
    ax.set_xscale("log")
    ax.set_xticks([t / 1e9 for t in ticks], [f"{t / 1e9:.2g}B\n{setting[t]}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("model parameters (log scale), batch × sequence")
    ax.set_ylabel("peak memory of one training step (GiB)")
    ax.set_title("Peak memory: measured vs. predicted")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, out)


def speed_plot(data: dict, out: Path) -> Path | None:
    """Forward+backward time relative to dense LoRA per configuration, and, when measured, materialize
    throughput against the memory-copy ceiling."""
    rows = data.get("rows", {})
    steps = rows.get("steps", []) if isinstance(rows, dict) else rows
    mat = rows.get("materialize", []) if isinstance(rows, dict) else []
    if not steps:
        return None
    ncols = 2 if mat else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6 * ncols, 0.45 * len(steps) + 1.8), squeeze=False)
    ax = axes[0][0]
    names = [s["config"] for s in steps]
    ratios = [s["ratio_vs_dense"] for s in steps]
    ax.barh(range(len(steps)), ratios, color=["C7" if s.get("kind") == "dense" else "C0" for s in steps])
    ax.set_yticks(range(len(steps)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_xlabel("forward+backward time / dense LoRA's")
    dim = steps[0].get("dim")
    ax.set_title(f"One {dim}x{dim} layer" if dim else "One layer")
    if mat:
        ax = axes[0][1]
        q = [m["quantizer"] for m in mat]
        y = range(len(mat))
        ax.barh([i - 0.2 for i in y], [m["materialize_gbps"] for m in mat], height=0.4, label="materialize")
        ax.barh([i + 0.2 for i in y], [m["copy_gbps"] for m in mat], height=0.4, label="copy (ceiling)",
                color="C7")
        ax.set_yticks(list(y), q, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("GB/s of float32 weight written")
        ax.set_title("Materialize throughput")
        ax.legend(fontsize=8)
    return _save(fig, out)


def finetune_plot(data: dict, out: Path) -> Path | None:
    """Validation loss (and ROUGE-L when present) before and after finetuning, per configuration."""
    rows = [r for r in data.get("rows", []) if r.get("loss_before") is not None or r.get("loss_after") is not None]
    if not rows:
        return None
    panels = [("loss", "validation loss")]
    if any(r.get("rougeL_after") is not None for r in rows):
        panels.append(("rougeL", "ROUGE-L"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    x = range(len(rows))
    for ax, (key, title) in zip(axes[0], panels, strict=True):
        for off, when, color in ((-0.2, "before", "C7"), (0.2, "after", "C0")):
            vals = [r.get(f"{key}_{when}") for r in rows]
            ax.bar([i + off for i in x], [float("nan") if v is None else v for v in vals], width=0.4,
                   label=when, color=color)
        ax.set_xticks(list(x), [str(r["config"]) for r in rows], rotation=30, ha="right", fontsize=8)
        ax.set_title(f"docsum: {title} before / after finetuning")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, out)


def _quality_plot() -> Callable[[Path], Path | None] | None:
    """``benchmarks.plot_quality.quality_plot`` when that module exists (another script owns the figure)."""
    if importlib.util.find_spec("benchmarks.plot_quality") is None:
        return None
    return getattr(importlib.import_module("benchmarks.plot_quality"), "quality_plot", None)


# (figure name, data sections in order of preference, sections whose rows are added when they exist,
# function, caption)
FIGURES: list[tuple[str, tuple[str, ...], tuple[str, ...], Callable[[dict, Path], Path | None], str]] = [
    ("memory", ("memory", "memory-quick"), ("memory-scale",), memory_plot,
     "Peak memory of one training step, measured and predicted, vs. model size"),
    ("speed", ("layer", "layer-quick"), (), speed_plot,
     "Forward+backward time of one layer relative to dense LoRA; materialize throughput"),
    ("finetune", ("finetune", "finetune-quick"), (), finetune_plot, "docsum finetuning: before and after"),
]


def make_figures(data_dir: Path = DATA, img_dir: Path = IMG, quality: bool = True) -> list[tuple[str, Path, str]]:
    """Draw every figure whose data exists in ``data_dir`` into ``img_dir``; ``(name, png, caption)`` each."""
    drawn = []
    for name, sections, extra, fn, caption in FIGURES:
        data = next((d for s in sections if (d := read_data(s, data_dir)) is not None), None)
        if data is None:  # a run of a subset names its section after it (finetune-steps80-dense-nf4)
            found = sorted(data_dir.glob(f"{sections[0]}-*.json"), key=lambda f: f.stat().st_mtime)
            data = read_data(found[-1].stem, data_dir) if found else None
        if data is None:
            continue
        commands = [data.get("command", "?")]
        for more in filter(None, (read_data(s, data_dir) for s in extra)):
            data = {**data, "rows": [*data["rows"], *more["rows"]]}
            commands.append(more.get("command", "?"))
        if (path := fn(data, img_dir / f"{name}.png")) is not None:
            drawn.append((name, path, f"{caption} (from {', '.join(f'`{c}`' for c in commands)})"))
    if quality and (qp := _quality_plot()) is not None:
        # it reads its own data; where it takes a data folder, the same one as ours
        takes_dir = "data_dir" in inspect.signature(qp).parameters
        out = img_dir / "quality.png"
        if (path := qp(out, data_dir=data_dir) if takes_dir else qp(out)) is not None:
            drawn.insert(0, ("quality", Path(path), "Perplexity vs. bits per weight, per quantizer"))
    return drawn


def main() -> None:
    drawn = make_figures()
    for name, path, _ in drawn:
        print(f"{name}: {path}")
    if not drawn:
        print("no data in docs/data yet: run the benchmarks first (python -m benchmarks.run)")
        return
    rel = os.path.relpath(IMG, REPORT.parent)  # links relative to the page, wherever the page is
    body = "\n\n".join(f"**{cap}**\n\n![{name}]({rel}/{path.name})" for name, path, cap in drawn)
    write_section("figures", "Figures", "python -m benchmarks.plots",
                  f"Drawn from the raw results in `{os.path.relpath(DATA, REPORT.parent.parent)}/`; each table "
                  "above has the numbers.\n\n" + body)


if __name__ == "__main__":
    main()
