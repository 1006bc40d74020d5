"""Regenerate the benchmark report: run every benchmark command, one after the other, each in its own process.

    python -m benchmarks.run                 # every section of docs/benchmarks.md (many hours on a 2-core machine)
    python -m benchmarks.run --quick         # a smaller report in about 20 minutes: docs/benchmarks-quick.md
    python -m benchmarks.run --only memory,layer
    python -m benchmarks.run --list          # the commands, without running them

:data:`JOBS` is the list of commands that write docs/benchmarks.md, one per section (or group of sections):
``tests/test_bench_run.py`` checks that every section of the page names one of them, so a section cannot go
stale without a command that regenerates it. Each script writes its own sections
(``benchmarks.report.write_section``, with the machine, versions, command and date) and its raw results
(``<report dir>/data/<section>.json``); a script that fails is reported at the end and the others still run.

``--quick`` runs :data:`QUICK_JOBS`, every script's ``--quick`` mode on a subset of its configurations, and
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

# (name, module, args): the commands behind the sections of docs/benchmarks.md, in report order (quality,
# finetuning, merging, memory, speed). Most are the scripts' --quick modes: the full sizes take hours each
# on 2 cores, and the page says which size each figure is. A name may repeat (--only selects them all).
JOBS: list[tuple[str, str, list[str]]] = [
    ("quantizers", "bench_quantizers", []),
    ("quipsharp", "bench_quipsharp", ["--quick", "--threads", "1"]),
    ("quipsharp", "bench_quipsharp", ["--quick", "--threads", "1", "--ft", "16", "--e2e", "16", "--presets",
                                      "quip#-4bit"]),
    ("quipsharp", "bench_quipsharp", ["--quick", "--threads", "1", "--ft", "16", "--e2e", "32", "--presets",
                                      "quip#-2bit"]),
    # the same on 128 calibration windows: on 32 the end-to-end stage fits the windows, not the text
    ("quipsharp", "bench_quipsharp", ["--quick", "--n-cal", "128", "--threads", "1", "--ft", "16", "--e2e", "32",
                                      "--presets", "quip#-2bit"]),
    ("quipsharp", "bench_quipsharp", ["--quick", "--n-cal", "128", "--threads", "1", "--ft", "16", "--e2e", "16",
                                      "--presets", "quip#-4bit"]),
    ("optq_ladder", "bench_optq_ladder", ["--quick"]),
    ("optq_presets", "bench_optq_presets", ["--quick", "--configs", "3asym64", "4asym128", "4asym64"]),
    ("optq_solver", "bench_optq_solver", []),
    ("finetune", "bench_finetune", ["--quick"]),
    ("finetune", "bench_finetune", ["--quick", "--steps", "80", "--configs", "dense,quip#-2bit-ft+residual"]),
    ("finetune", "bench_finetune", ["--quick", "--steps", "80", "--n-cal", "128", "--configs",
                                    "dense,quip#-2bit-ft+residual,quip#-2bit-ft"]),
    ("finetune", "bench_finetune", ["--lora-init", "--quick"]),
    ("merge", "bench_merge", ["--quick", "--threads", "1"]),
    ("memory", "bench_memory", []),
    ("memory", "bench_memory", ["--paper"]),
    ("memory", "bench_memory", ["--scale"]),
    ("memory", "bench_memory", ["--moe"]),
    ("fsdp", "bench_fsdp", ["--model", "llama-0.5b", "--quantizers", "rtn-2bit,rtn-4bit", "--write"]),
    ("layer", "bench_layer", []),
    ("kernels", "bench_layer", ["--kernels", "--no-compile", "--lm-reps", "2", "--new-tokens", "16"]),
    ("architectures", "bench_architectures", []),
]
# The quick report: cut to the configurations that answer the headline questions (4-bit OPTQ against
# GPTQModel; 2-bit QuIP# against 3-bit OPTQ and NF4; 2-bit finetuning against dense LoRA and NF4), to finish
# in about 20 minutes on 2 cores
QUICK_JOBS: list[tuple[str, str, list[str]]] = [
    ("quantizers", "bench_quantizers", ["--quick"]),
    ("optq", "bench_optq", ["--quick", "--bits", "4", "--act-order", "off"]),
    ("optq_solver", "bench_optq_solver", ["--blocks", "0", "--bits", "4"]),
    ("quipsharp", "bench_quipsharp", ["--quick", "--presets", "quip#-2bit,optq-3bit,nf4"]),
    ("finetune", "bench_finetune", ["--quick", "--configs", "dense,quip#-2bit,nf4"]),
    ("merge", "bench_merge", ["--quick"]),
    ("memory", "bench_memory", ["--quick"]),
    ("memory", "bench_memory", ["--paper"]),
    ("layer", "bench_layer", ["--quick"]),
]
BENCHMARKS = tuple(dict.fromkeys(name for name, _, _ in [*JOBS, *QUICK_JOBS]))
QUICK_REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks-quick.md"


def command(module: str, args: list[str]) -> str:
    """The shell form of a job, as the sections print it: ``python -m benchmarks.<module> <args>``."""
    import shlex

    return " ".join(["python", "-m", f"benchmarks.{module}", *map(shlex.quote, args)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every script's --quick mode on a subset (QUICK_JOBS)")
    ap.add_argument("--only", default=None, help="comma-separated subset of " + ",".join(BENCHMARKS))
    ap.add_argument("--list", action="store_true", help="print the commands and exit")
    ap.add_argument("--report", type=Path, default=None, help="the page to write (default: docs/benchmarks.md; "
                    "with --quick, docs/benchmarks-quick.md)")
    a = ap.parse_args()
    jobs = QUICK_JOBS if a.quick else JOBS
    if a.only is not None:
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        if unknown := [n for n in names if n not in BENCHMARKS]:
            ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
        jobs = [j for j in jobs if j[0] in names]
    jobs = [*jobs, ("plots", "plots", [])]  # the figures last, from every script's data
    if a.list:
        print("\n".join(command(m, args) for _, m, args in jobs))
        return
    env = dict(os.environ)
    if report := a.report or (QUICK_REPORT if a.quick else None):
        env["MODULORA_BENCH_REPORT"] = str(report.resolve())  # benchmarks.report reads it in every child
    results: list[tuple[str, str, float]] = []
    for _, module, args in jobs:
        cmd = command(module, args)
        if importlib.util.find_spec(f"benchmarks.{module}") is None:
            results.append((cmd, "missing", 0.0))
            continue
        print(f"== {cmd}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", *args], env=env).returncode
        results.append((cmd, "ok" if rc == 0 else f"failed (exit {rc})", time.perf_counter() - t0))
    print(f"\nreport: {report or 'docs/benchmarks.md'}\n\n| command | result | minutes |\n|---|---|---|")
    for cmd, status, secs in results:
        print(f"| `{cmd}` | {status} | {secs / 60:.1f} |")
    if any(status != "ok" for _, status, _ in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
