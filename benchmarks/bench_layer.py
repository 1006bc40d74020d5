"""Forward+backward of one LoRA linear: ModuLoRA (packed base, re-materialized) vs. dense nn.Linear + LoRA.

Times are medians of interleaved repetitions in one process (ratios, since the machine is shared). Peak
extra memory is measured per configuration in a fresh subprocess: the kernel's peak RSS during one step
minus the RSS just before it, with glibc forced to mmap large blocks so freed memory leaves RSS at once.
Configurations: ``--preset`` whole and in row tiles (``chunk_rows``); each of ``--presets`` whole, and a
plugin with a fast path both ways (its own ``matmul``/``matmul_T``, and the generic materialize path). Then
materialize throughput (bytes of the dense weight written per second) against a plain copy of a weight of
the same size, the memory-copy ceiling.

    python -m benchmarks.bench_layer            # 4096x4096, 1024 tokens (the issue's setting)
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
    """``kind``: ``dense``, ``chunk=<rows|none>`` (of ``preset``), or ``<preset>:<fast|generic>``."""
    torch.manual_seed(0)
    w = torch.randn(dim, dim) * dim**-0.5
    if kind == "dense":
        return DenseLoRA(w, r)
    chunk, path = None, None
    if kind.startswith("chunk="):
        chunk = None if kind == "chunk=none" else int(kind.split("=")[1])
    else:
        preset, path = kind.rsplit(":", 1)
    bq = modulora.get_quantizer(preset)
    # quantizers that calibrate get an identity Hessian: enough for timing, not for quality
    packed = bq.quantize(w, torch.eye(dim) if bq.capabilities().needs_calibration else None)
    layer = ModuLoRALinear(packed, bq.quantizer, r=r, alpha=2 * r, chunk_rows=chunk)
    if path == "generic":
        layer.use_fast_path = False
    nn.init.normal_(layer.lora_B.weight, std=0.01)
    return layer


def kinds_of(preset: str, presets: list[str]) -> list[str]:
    """Every configuration to run: dense, ``preset`` whole and tiled, each other preset on each path."""
    kinds = ["dense", "chunk=none", "chunk=1024", "chunk=256"]
    have = set(modulora.available_quantizers())
    for p in presets:
        if p not in have:
            print(f"skipping {p}: not installed")
            continue
        if p == preset:
            continue
        fast = modulora.get_quantizer(p).capabilities().fast_path
        kinds += [f"{p}:fast", f"{p}:generic"] if fast else [f"{p}:generic"]
    return kinds


def label(kind: str, preset: str) -> str:
    """The configuration's name in the report."""
    if kind == "dense":
        return "dense nn.Linear + LoRA"
    if kind.startswith("chunk="):
        return f"ModuLoRA {preset}, chunk_rows={kind.split('=')[1]}"
    p, path = kind.rsplit(":", 1)
    return f"ModuLoRA {p}, {'fast path' if path == 'fast' else 'generic (materialize)'}"


def materialize_throughput(layer: ModuLoRALinear, reps: int) -> tuple[float, float]:
    """``(materialize GB/s, copy GB/s)``: bytes of the float32 weight produced per second by the plugin's
    ``materialize``, and by ``copy_`` of a float32 tensor of the same size (the memory-bandwidth ceiling)."""
    packed = layer.packed
    src = torch.randn(packed.shape)
    dst = torch.empty_like(src)
    mat, cp = [], []
    for _ in range(reps + 1):  # the first of each is a warm-up
        t0 = time.perf_counter()
        layer.quantizer.materialize(packed, dtype=torch.float32)
        mat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        cp.append(time.perf_counter() - t0)
    nbytes = src.numel() * 4
    return nbytes / statistics.median(mat[1:]) / 1e9, nbytes / statistics.median(cp[1:]) / 1e9


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
    ap.add_argument("--preset", default="rtn-4bit", help="the quantizer of the chunk_rows comparison")
    ap.add_argument("--presets", default="rtn-2bit,rtn-3bit,nf4,hqq-4bit,quip#-2bit",
                    help="more quantizers to compare, whole-layer, on each path they have")
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
    kinds = kinds_of(a.preset, [p.strip() for p in a.presets.split(",") if p.strip()])
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
    # materialize throughput, once per quantizer, on the layers already quantized
    whole = {a.preset: "chunk=none", **{k.rsplit(":", 1)[0]: k for k in kinds if ":" in k}}
    tput = {p: materialize_throughput(layers[k], a.reps) for p, k in whole.items()}
    del layers
    mem = {k: measure_memory(k, a.dim, a.tokens, a.preset, a.r) for k in kinds}
    weight_mib = a.dim * a.dim * 4 / MiB
    base_t = statistics.median(times["dense"])
    lines, data = [], []
    for k in kinds:
        t = statistics.median(times[k])
        over = mem[k] - mem["dense"]
        lines.append(f"| {label(k, a.preset)} | {t * 1e3:.0f} | {t / base_t:.2f} | {mem[k]:.1f} | {over:+.1f} "
                     f"| {over / weight_mib:+.3f} |")
        data.append({"config": label(k, a.preset), "kind": k, "ms": round(t * 1e3, 2),
                     "ratio_vs_dense": round(t / base_t, 4), "peak_extra_mib": round(mem[k], 2),
                     "dim": a.dim, "tokens": a.tokens})
    tlines = [f"| {p} | {m:.2f} | {c:.2f} | {m / c:.2f} |" for p, (m, c) in tput.items()]
    body = (
        f"One {a.dim}x{a.dim} layer, {a.tokens} tokens, float32, LoRA r={a.r}; forward+backward "
        f"(input gradient + LoRA gradients). Median of {a.reps} interleaved repetitions. Peak extra memory: "
        f"peak RSS during one step above the RSS before it, each configuration in its own process. "
        f"Dense weight: {weight_mib:.1f} MiB. Quantizers that calibrate were given an identity Hessian.\n\n"
        "| configuration | ms / step | time ratio vs dense | peak extra MiB | vs dense MiB | vs dense, fraction of W |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Materialize throughput: GB/s of float32 weight written by `materialize` of the whole {a.dim}x{a.dim} "
        f"weight, against `copy_` of a float32 tensor of that size (the memory-copy ceiling), medians of "
        f"{a.reps}.\n\n| quantizer | materialize GB/s | copy GB/s | fraction of ceiling |\n|---|---|---|---|\n"
        + "\n".join(tlines) + "\n"
    )
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        name = "layer" + ("-quick" if a.quick else "")
        cmd = "python -m benchmarks.bench_layer" + (" --quick" if a.quick else "")
        write_data(name, cmd, {"steps": data, "materialize": [
            {"quantizer": p, "materialize_gbps": round(m, 3), "copy_gbps": round(c, 3)} for p, (m, c) in tput.items()]})
        write_section(name, "One layer: forward+backward time and memory", cmd, body)


if __name__ == "__main__":
    main()
