"""Regenerate docs/benchmarks.md: run every benchmark script, one after the other, each in its own process.

    python -m benchmarks.run                 # the full report (hours on a 2-core machine)
    python -m benchmarks.run --quick         # every script's --quick mode
    python -m benchmarks.run --only memory,layer

Each script writes its own sections of the report (``benchmarks.report.write_section``, with the machine,
versions, command and date) and its raw results (``docs/data/<section>.json``); a script that fails is
reported at the end and the others still run. Last, ``benchmarks.plots`` draws the figures (docs/img/) from
whatever data exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import time

# Report order: quality, finetuning, memory, speed. A name is ``benchmarks.bench_<name>``.
BENCHMARKS = ("quantizers", "optq", "quipsharp", "finetune", "memory", "layer")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="pass --quick to every script")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of "
                    + ",".join(BENCHMARKS))
    a = ap.parse_args()
    names = [n.strip() for n in a.only.split(",") if n.strip()]
    if unknown := [n for n in names if n not in BENCHMARKS]:
        ap.error(f"unknown benchmark(s) {unknown}; choose from {', '.join(BENCHMARKS)}")
    results: list[tuple[str, str, float]] = []
    for name in [*names, "plots"]:  # the figures last, from every script's data
        module = "benchmarks.plots" if name == "plots" else f"benchmarks.bench_{name}"
        if importlib.util.find_spec(module) is None:
            results.append((name, "missing", 0.0))
            continue
        cmd = [sys.executable, "-m", module] + (["--quick"] if a.quick and name != "plots" else [])
        print(f"== {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run(cmd).returncode  # its output goes straight to ours
        results.append((name, "ok" if rc == 0 else f"failed (exit {rc})", time.perf_counter() - t0))
    print("\n| benchmark | result | minutes |\n|---|---|---|")
    for name, status, secs in results:
        print(f"| {name} | {status} | {secs / 60:.1f} |")
    if any(status != "ok" for _, status, _ in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
