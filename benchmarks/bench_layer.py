"""Forward+backward of one LoRA linear: ModuLoRA (packed base, re-materialized) vs. dense nn.Linear + LoRA.

Times are medians of interleaved repetitions in one process (ratios, since the machine is shared). Peak
extra memory is measured per configuration in a fresh subprocess: the kernel's peak RSS during one step
minus the RSS just before it, with glibc forced to mmap large blocks so freed memory leaves RSS at once.

    python -m benchmarks.bench_layer            # 4096x4096, 1024 tokens, rtn-4bit (the issue's setting)
    python -m benchmarks.bench_layer --quick    # 1024x1024, 256 tokens
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import modulora
from modulora_core.layers import ModuLoRALinear

MiB = 1 << 20


class DenseLoRA(nn.Module):
    """The baseline: a frozen dense nn.Linear plus the same LoRA path."""

    def __init__(self, w: torch.Tensor, r: int) -> None:
        super().__init__()
        self.base = nn.Linear(w.shape[1], w.shape[0], bias=False)
        self.base.weight = nn.Parameter(w.clone(), requires_grad=False)
        self.lora_A = nn.Linear(w.shape[1], r, bias=False)
        self.lora_B = nn.Linear(r, w.shape[0], bias=False)
        nn.init.normal_(self.lora_B.weight, std=0.01)
        self.scaling = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def build(kind: str, dim: int, preset: str, r: int) -> nn.Module:
    """``kind`` is ``dense`` or ``chunk=<rows|none>``."""
    torch.manual_seed(0)
    w = torch.randn(dim, dim) * dim**-0.5
    if kind == "dense":
        return DenseLoRA(w, r)
    chunk = kind.split("=")[1]
    bq = modulora.get_quantizer(preset)
    layer = ModuLoRALinear(bq.quantize(w), bq.quantizer, r=r, alpha=2 * r,
                           chunk_rows=None if chunk == "none" else int(chunk))
    nn.init.normal_(layer.lora_B.weight, std=0.01)
    return layer


def step(layer: nn.Module, x: torch.Tensor) -> None:
    y = layer(x)
    y.backward(torch.ones_like(y))
    x.grad = None
    for p in layer.parameters():
        p.grad = None


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_memory_child(kind: str, dim: int, tokens: int, preset: str, r: int) -> None:
    """Run in a subprocess: one warm-up step, then the peak RSS of one step above the RSS before it.

    The kernel's high-water mark (VmHWM) is reset just before the step (``5 > /proc/self/clear_refs``), so
    every transient allocation counts, however short, and the setup's own peak does not.
    """
    layer = build(kind, dim, preset, r)
    x = torch.randn(tokens, dim, requires_grad=True)
    step(layer, x)  # warm-up: thread pools, allocator arenas
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step(layer, x)
    print(json.dumps({"extra_mib": _status_mib("VmHWM") - before}))


def measure_memory(kind: str, dim: int, tokens: int, preset: str, r: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_layer", "--child", kind, "--dim", str(dim),
         "--tokens", str(tokens), "--preset", preset, "--r", str(r)],
        check=True, capture_output=True, text=True, env=env,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])["extra_mib"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--preset", default="rtn-4bit")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    if a.quick:
        a.dim, a.tokens, a.reps = 1024, 256, 5
    if a.child:
        measure_memory_child(a.child, a.dim, a.tokens, a.preset, a.r)
        return
    kinds = ["dense", "chunk=none", "chunk=1024", "chunk=256"]
    layers = {k: build(k, a.dim, a.preset, a.r) for k in kinds}
    x = torch.randn(a.tokens, a.dim, requires_grad=True)
    times: dict[str, list[float]] = {k: [] for k in kinds}
    for k in kinds:
        step(layers[k], x)  # warm-up
    for _ in range(a.reps):  # interleaved, so drift in machine load hits every configuration alike
        for k in kinds:
            t0 = time.perf_counter()
            step(layers[k], x)
            times[k].append(time.perf_counter() - t0)
    del layers
    mem = {k: measure_memory(k, a.dim, a.tokens, a.preset, a.r) for k in kinds}
    weight_mib = a.dim * a.dim * 4 / MiB
    base_t = statistics.median(times["dense"])
    rows = []
    for k in kinds:
        t = statistics.median(times[k])
        over = mem[k] - mem["dense"]
        rows.append(f"| {'dense nn.Linear + LoRA' if k == 'dense' else 'ModuLoRA ' + a.preset + ', ' + k.replace('chunk=', 'chunk_rows=')} "
                    f"| {t * 1e3:.0f} | {t / base_t:.2f} | {mem[k]:.1f} | {over:+.1f} | {over / weight_mib:+.3f} |")
    body = (
        f"One {a.dim}x{a.dim} layer, {a.tokens} tokens, float32, LoRA r={a.r}; forward+backward "
        f"(input gradient + LoRA gradients). Median of {a.reps} interleaved repetitions. Peak extra memory: "
        f"peak RSS during one step above the RSS before it, each configuration in its own process. "
        f"Dense weight: {weight_mib:.1f} MiB.\n\n"
        "| configuration | ms / step | time ratio vs dense | peak extra MiB | vs dense MiB | vs dense, fraction of W |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    print(body)
    if not a.no_write:
        from benchmarks.report import write_section

        cmd = "python -m benchmarks.bench_layer" + (" --quick" if a.quick else "")
        write_section("layer" + ("-quick" if a.quick else ""), "One layer: forward+backward time and memory",
                      cmd, body)


if __name__ == "__main__":
    main()
