"""Forward+backward of one LoRA linear: ModuLoRA (packed base, re-materialized) vs. dense nn.Linear + LoRA.

The ModuLoRA layer is what ``peft.get_peft_model`` builds over a quantized model: PEFT's LoRA layer
(``QuantizedLoraLinear``) around a frozen ``QuantizedLinear``. Each quantized configuration also runs as
the 0.1 design (own LoRA layer): ``ModuLoRALinear``'s forward, reproduced below in ``Design01LoRA`` on
the same packed base, so that the redesign's cost (issue 11: at most 5% worse) is measured side by side.

Times are medians of interleaved repetitions in one process (ratios, since the machine is shared); each
new-design layer and its 0.1 twin run back to back, in alternating order, and their ratio is the median
of the per-repetition ratios. Peak extra memory is measured per configuration in a fresh subprocess: the
kernel's peak RSS during one step minus the RSS just before it, with glibc forced to mmap large blocks so
freed memory leaves RSS at once. Configurations: ``--preset`` whole and in row tiles (``chunk_rows``);
each of ``--presets`` whole, and a plugin with a fast path both ways (its own ``matmul``/``matmul_T``, and
the generic materialize path). Then materialize throughput (bytes of the dense weight written per second)
against a plain copy of a weight of the same size, the memory-copy ceiling.

    python -m benchmarks.bench_layer            # 4096x4096, 1024 tokens (the issue's setting)
    python -m benchmarks.bench_layer --quick    # 1024x1024, 256 tokens
    python -m benchmarks.bench_layer --kernels  # materialize eager vs compiled, and the one-token decode step

``--kernels`` (:mod:`benchmarks.bench_kernels`) measures, per quantizer, materialize throughput against the copy
ceiling and a one-token forward of the frozen base side by side: dense ``F.linear``, materialize + ``F.linear``,
and the plugin's decode path, each with the plugins' torch code, ``torch.compile``'d, and the C kernels; then
SmolLM2-135M generation tokens/s and one training step, torch code against the C kernels.
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
from benchmarks import bench_kernels
from modulora_core import QuantizedLinear
from modulora_core.autograd import quantized_matmul

MiB = 1 << 20
V01 = "v01/"  # kind prefix of the 0.1 design's twin of a configuration
V01_NAME = "0.1 design (own LoRA layer)"


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


class Design01LoRA(nn.Module):
    """0.1 design (own LoRA layer): the forward of 0.1's ``ModuLoRALinear`` (``git show
    c6ad10f:modulora_core/layers.py``), ``quantized_matmul(x, W packed) + b + scaling * B(A(dropout(x)))``,
    over a QuantizedLinear that only holds the packed buffers (its ``packed`` property is 0.1's verbatim)."""

    def __init__(self, base: QuantizedLinear, r: int, alpha: float) -> None:
        super().__init__()
        self.base, self.scaling = base, alpha / r
        self.lora_dropout = nn.Identity()  # 0.1 used Identity when dropout was 0
        self.lora_A = nn.Linear(base.in_features, r, bias=False)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        b = self.base
        y = quantized_matmul(x, b.quantizer, b.packed, chunk_rows=b.chunk_rows, fast=b.use_fast_path)
        if b.bias is not None:
            y = y + b.bias.to(y.dtype)
        a = self.lora_A.weight
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
        return y + (lora * self.scaling).to(y.dtype)


def peft_lora(base: QuantizedLinear, r: int, alpha: float) -> nn.Module:
    """PEFT's LoRA layer over ``base``, as ``get_peft_model`` builds it (here ``inject_adapter_in_model`` on a
    one-module holder, to time the layer alone)."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.ModuleDict({"proj": base})
    # PEFT reads the device off the model's first parameter; a packed layer without bias has none
    holder.register_parameter("anchor", nn.Parameter(torch.zeros(1), requires_grad=False))
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=alpha, target_modules=["proj"]), holder)
    return holder["proj"]


def base_of(layer: nn.Module) -> QuantizedLinear:
    """The QuantizedLinear under either design's layer."""
    return layer.base if isinstance(layer, Design01LoRA) else layer.get_base_layer()


def build(kind: str, dim: int, preset: str, r: int) -> nn.Module:
    """``kind``: ``dense``, ``chunk=<rows|none>`` (of ``preset``), or ``<preset>:<fast|generic>``; with the
    prefix ``v01/``, the same quantized layer in the 0.1 design."""
    torch.manual_seed(0)
    w = torch.randn(dim, dim) * dim**-0.5
    if kind == "dense":
        return DenseLoRA(w, r)
    v01 = kind.startswith(V01)
    kind = kind.removeprefix(V01)
    chunk, path = None, None
    if kind.startswith("chunk="):
        chunk = None if kind == "chunk=none" else int(kind.split("=")[1])
    else:
        preset, path = kind.rsplit(":", 1)
    bq = modulora.get_preset(preset)
    # quantizers that calibrate get an identity Hessian: enough for timing, not for quality
    packed = bq.quantize(w, torch.eye(dim) if bq.capabilities().needs_calibration else None)
    base = QuantizedLinear(packed, bq.quantizer, chunk_rows=chunk, preset=bq.name)
    if path == "generic":
        base.use_fast_path = False
    layer = Design01LoRA(base, r, 2 * r) if v01 else peft_lora(base, r, 2 * r)
    torch.manual_seed(1)  # the same A and B in both designs
    a = layer.lora_A.weight if v01 else layer.lora_A["default"].weight
    b = layer.lora_B.weight if v01 else layer.lora_B["default"].weight
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=5**0.5)
        nn.init.normal_(b, std=0.01)
    return layer


def kinds_of(preset: str, presets: list[str]) -> list[str]:
    """Every configuration to run: dense, ``preset`` whole and tiled, each other preset on each path (the
    0.1 twins, ``v01/<kind>``, are added by the caller)."""
    kinds = ["dense", "chunk=none", "chunk=1024", "chunk=256"]
    have = set(modulora.available_presets())
    for p in presets:
        if p not in have:
            print(f"skipping {p}: not installed")
            continue
        if p == preset:
            continue
        fast = modulora.get_preset(p).capabilities().fast_path
        kinds += [f"{p}:fast", f"{p}:generic"] if fast else [f"{p}:generic"]
    return kinds


def label(kind: str, preset: str) -> str:
    """The configuration's name in the report."""
    if kind == "dense":
        return "dense nn.Linear + LoRA"
    who = V01_NAME if kind.startswith(V01) else "ModuLoRA"
    kind = kind.removeprefix(V01)
    if kind.startswith("chunk="):
        return f"{who} {preset}, chunk_rows={kind.split('=')[1]}"
    p, path = kind.rsplit(":", 1)
    return f"{who} {p}, {'fast path' if path == 'fast' else 'generic (materialize)'}"


def materialize_throughput(layer: QuantizedLinear, reps: int) -> tuple[float, float]:
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
    """One forward+backward; the gradients are dropped as ``optimizer.zero_grad`` would (a list of
    parameters, not a walk of the module tree, whose cost would depend on the layer's submodules)."""
    y = layer(x)
    y.backward(torch.ones_like(y))
    x.grad = None
    params = layer.__dict__.get("_bench_params")
    if params is None:
        params = layer.__dict__["_bench_params"] = [p for p in layer.parameters() if p.requires_grad]
    for p in params:
        p.grad = None


def call_overhead(reps: int, calls: int = 200) -> tuple[float, float, float]:
    """``(new µs, 0.1 µs, difference µs)``: forward+backward of a 64x64 rtn-4bit layer on 8 tokens, where the
    arithmetic is negligible, so the difference is the fixed per-call cost of PEFT's layer over 0.1's (its
    Python: adapter bookkeeping, argument checks, dtype casts). Minimum over ``reps`` blocks of ``calls``,
    on one torch thread: on a loaded machine, waking a second thread per op costs more, and more erratically,
    than the Python being measured."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    layers = {k: build(k, 64, "rtn-4bit", 8) for k in ("chunk=none", V01 + "chunk=none")}
    x = torch.randn(8, 64, requires_grad=True)
    best = {k: float("inf") for k in layers}
    for rep in range(reps + 1):
        for k in layers if rep % 2 == 0 else list(layers)[::-1]:
            t0 = time.perf_counter()
            for _ in range(calls):
                step(layers[k], x)
            if rep:  # the first block warms up
                best[k] = min(best[k], (time.perf_counter() - t0) / calls * 1e6)
    torch.set_num_threads(threads)
    new, old = best["chunk=none"], best[V01 + "chunk=none"]
    return new, old, new - old


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


def run_times(layers: dict[str, nn.Module], x: torch.Tensor, reps: int) -> dict[str, list[float]]:
    """Seconds per step of every layer, ``reps`` interleaved rounds (so drift in machine load hits every
    configuration alike); a layer and its 0.1 twin run back to back, in alternating order."""
    groups = [[k] for k in layers if not k.startswith(V01) and V01 + k not in layers]
    groups += [[k, V01 + k] for k in layers if V01 + k in layers]
    order = [k for k in layers if not k.startswith(V01)]
    groups.sort(key=lambda g: order.index(g[0]))
    times: dict[str, list[float]] = {k: [] for k in layers}
    for k in layers:
        step(layers[k], x)  # warm-up
    for rep in range(reps):
        for g in groups:
            for k in g if rep % 2 == 0 else g[::-1]:
                t0 = time.perf_counter()
                step(layers[k], x)
                times[k].append(time.perf_counter() - t0)
    return times


def paired_ratio(new: list[float], old: list[float]) -> tuple[float, float, float]:
    """Median, and first and third quartiles, of the per-repetition ratios new/old."""
    r = sorted(n / o for n, o in zip(new, old, strict=True))
    q = statistics.quantiles(r, n=4, method="inclusive") if len(r) > 1 else [r[0]] * 3
    return statistics.median(r), q[0], q[2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--preset", default="rtn-4bit", help="the quantizer of the chunk_rows comparison")
    ap.add_argument("--presets", default="rtn-2bit,rtn-3bit,nf4,hqq-4bit,quip#-2bit",
                    help="more quantizers to compare, whole-layer, on each path they have")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    ap.add_argument("--kernels", action="store_true", help="materialize and the decode step per way, SmolLM2 decode")
    bench_kernels.add_arguments(ap)
    a = ap.parse_args()
    if a.kernels:
        if a.presets == ap.get_default("presets"):
            a.presets = bench_kernels.KERNEL_PRESETS
        a.reps = min(a.reps, 7)
        bench_kernels.run_kernels(a)
        return
    if a.quick:
        a.dim, a.tokens, a.reps = 1024, 256, 7
    if a.child:
        measure_memory_child(a.child, a.dim, a.tokens, a.preset, a.r)
        return
    new_kinds = kinds_of(a.preset, [p.strip() for p in a.presets.split(",") if p.strip()])
    kinds = new_kinds + [V01 + k for k in new_kinds if k != "dense"]
    layers = {k: build(k, a.dim, a.preset, a.r) for k in kinds}
    x = torch.randn(a.tokens, a.dim, requires_grad=True)
    times = run_times(layers, x, a.reps)
    # materialize throughput, once per quantizer, on the layers already quantized
    whole = {a.preset: "chunk=none", **{k.rsplit(":", 1)[0]: k for k in new_kinds if ":" in k}}
    tput = {p: materialize_throughput(base_of(layers[k]), a.reps) for p, k in whole.items()}
    del layers
    overhead = call_overhead(max(a.reps, 15))
    mem = {k: measure_memory(k, a.dim, a.tokens, a.preset, a.r) for k in kinds}
    weight_mib = a.dim * a.dim * 4 / MiB
    base_t = statistics.median(times["dense"])
    lines, data, v01_data, worst = [], [], [], []
    for k in new_kinds:
        t = statistics.median(times[k])
        over = mem[k] - mem["dense"]
        row = {"config": label(k, a.preset), "kind": k, "ms": round(t * 1e3, 2),
               "ratio_vs_dense": round(t / base_t, 4), "peak_extra_mib": round(mem[k], 2),
               "dim": a.dim, "tokens": a.tokens}
        cells = f"| {label(k, a.preset)} | {t * 1e3:.0f} | {t / base_t:.2f} | {mem[k]:.1f} | {over / weight_mib:+.3f} |"
        if k == "dense":
            cells += " - | - | - | - |"
        else:
            o = V01 + k
            t_old = statistics.median(times[o])
            med, q1, q3 = paired_ratio(times[k], times[o])
            m_ratio = mem[k] / mem[o]
            worst.append((med, m_ratio, k))
            cells += f" {t_old * 1e3:.0f} | {mem[o]:.1f} | {med:.3f} [{q1:.3f}-{q3:.3f}] | {m_ratio:.3f} |"
            row.update(time_vs_v01=round(med, 4), time_vs_v01_q1=round(q1, 4), time_vs_v01_q3=round(q3, 4),
                       mem_vs_v01=round(m_ratio, 4))
            v01_data.append({"config": label(o, a.preset), "kind": o, "ms": round(t_old * 1e3, 2),
                             "ratio_vs_dense": round(t_old / base_t, 4), "peak_extra_mib": round(mem[o], 2),
                             "dim": a.dim, "tokens": a.tokens})
        lines.append(cells)
        data.append(row)
    t_worst = max(worst)
    m_worst = max(worst, key=lambda w: w[1])
    verdict = ("holds" if t_worst[0] <= 1.05 and m_worst[1] <= 1.05 else "does not hold")
    tlines = [f"| {p} | {m:.2f} | {c:.2f} | {m / c:.2f} |" for p, (m, c) in tput.items()]
    body = (
        f"One {a.dim}x{a.dim} layer, {a.tokens} tokens, float32, LoRA r={a.r}; forward+backward "
        f"(input gradient + LoRA gradients). ModuLoRA = PEFT's LoRA layer over a `QuantizedLinear` (what "
        f"`get_peft_model` builds). {V01_NAME} = the forward of 0.1's `ModuLoRALinear` (packed base + its own "
        f"LoRA A/B in one module), reproduced in the benchmark on the same packed weight; each ModuLoRA layer "
        f"and its 0.1 twin ran back to back in alternating order. Times: median of {a.reps} interleaved "
        f"repetitions; new / 0.1 time: median [quartiles] of the per-repetition ratios. Peak extra memory: "
        f"peak RSS during one step above the RSS before it, each configuration in its own process. "
        f"Dense weight: {weight_mib:.1f} MiB. Quantizers that calibrate were given an identity Hessian.\n\n"
        "| configuration | ms / step | time vs dense | peak extra MiB | vs dense, fraction of W "
        f"| {V01_NAME} ms | {V01_NAME} peak extra MiB | time new / 0.1 | peak extra memory new / 0.1 |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n\n"
        f"Issue 11's bound (new design at most 5% worse than 0.1 in one-layer time and memory) {verdict} here: "
        f"largest time ratio {t_worst[0]:.3f} ({label(t_worst[2], a.preset)}), largest memory ratio "
        f"{m_worst[1]:.3f} ({label(m_worst[2], a.preset)}). The fixed per-call cost of PEFT's layer over the "
        f"0.1 layer, measured where the arithmetic is negligible (64x64 rtn-4bit, 8 tokens, one torch "
        f"thread, best of {max(a.reps, 15)} blocks of 200 calls): {overhead[0]:.0f} µs against {overhead[1]:.0f} µs per "
        f"forward+backward, {overhead[2]:+.0f} µs, that is "
        f"{overhead[2] / 1e6 / statistics.median(times['chunk=none']) * 100:+.4f}% of the {a.preset} "
        "whole-layer step above.\n\n"
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
        write_data(name, cmd, {"steps": data, "design_0_1": v01_data, "call_overhead_us": {
            "new": round(overhead[0], 1), "v01": round(overhead[1], 1), "difference": round(overhead[2], 1)},
            "materialize": [
            {"quantizer": p, "materialize_gbps": round(m, 3), "copy_gbps": round(c, 3)} for p, (m, c) in tput.items()]})
        write_section(name, "One layer: forward+backward time and memory", cmd, body)


if __name__ == "__main__":
    main()
