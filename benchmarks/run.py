"""Regenerate the benchmark report: run every benchmark script, one after the other, each in its own process.

    python -m benchmarks.run                 # the full report, docs/benchmarks.md (hours on a 2-core machine)
    python -m benchmarks.run --quick         # a smaller report in about 20 minutes: docs/benchmarks-quick.md
    python -m benchmarks.run --only memory,layer

Each script writes its own sections of the report (``benchmarks.report.write_section``, with the machine,
versions, command and date) and its raw results (``<report dir>/data/<section>.json``); a script that fails
is reported at the end and the others still run. Last, ``benchmarks.plots`` draws the figures from whatever
data exists.

``--quick`` runs every script's ``--quick`` mode on a subset of its configurations (``QUICK_ARGS``) and
writes to a page of its own (``--report``), so that a quick run never overwrites the full tables.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

# Report order: quality, finetuning, merging, memory, speed. A name is ``benchmarks.bench_<name>``.
BENCHMARKS = ("quantizers", "optq", "optq_solver", "optq_ladder", "optq_presets", "quipsharp", "finetune", "merge", "memory", "layer")
# The quick report: each script's --quick mode, cut to the configurations that answer the headline
# questions (4-bit OPTQ against GPTQModel; 2-bit QuIP# against 3-bit OPTQ and NF4; 2-bit finetuning
# against dense LoRA and NF4), to finish in about 20 minutes on 2 cores
QUICK_ARGS: dict[str, list[str]] = {
    "quantizers": ["--quick"],
    "optq": ["--quick", "--bits", "4", "--act-order", "off"],
    "optq_solver": ["--blocks", "0", "--bits", "4"],
    "optq_ladder": ["--quick", "--ladder-bits"],  # ours at our defaults and GPTQModel at its defaults, 3 and 4 bits
    "optq_presets": ["--quick", "--bits", "3", "--groups", "128", "--sym", "sym"],
    "quipsharp": ["--quick", "--presets", "quip#-2bit,optq-3bit,nf4"],
    "finetune": ["--quick", "--configs", "dense,quip#-2bit,nf4"],
    "merge": ["--quick"],
    "memory": ["--quick"],
    "layer": ["--quick"],
}
QUICK_REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-quick.md"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every script's --quick mode on a subset (QUICK_ARGS)")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of "
                    + ",".join(BENCHMARKS))
    ap.add_argument("--report", type=Path, default=None, help="the page to write (default: docs/benchmarks.md; "
                    "with --quick, docs/benchmarks-quick.md)")
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    if unknown := [n for n in names if n not in BENCHMARKS]:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    env = dict(os.environ)
    if report := a.report or (QUICK_REPORT if a.quick else None):
        env["MODULORA_BENCH_REPORT"] = str(report.resolve())  # benchmarks.report reads it in every child
    results: list[tuple[str, str, float]] = []
    for name in [*names, "plots"]:  # the figures last, from every script's data
        module = "benchmarks.plots" if name == "plots" else f"benchmarks.bench_{name}"
        if importlib.util.find_spec(module) is None:
            results.append((name, "missing", 0.0))
            continue
        cmd = [sys.executable, "-m", module] + (QUICK_ARGS.get(name, []) if a.quick else [])
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd, env=env).returncode  # its output goes straight to ours
        results.append((name, "ok" if rc == 0 else f"failed (exit {rc})", time.perf_counter() - t0))
    print(f"\nreport: {report or 'docs/benchmarks.md'}\n\n| benchmark | result | minutes |\n|---|---|---|")
    for name, status, secs in results:
        print(f"| {name} | {status} | {secs / 60:.1f} |")
    if any(status != "ok" for _, status, _ in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
