"""``python -m benchmarks.bench_layer --kernels``: materialize throughput and the one-token decode step per
quantizer, three ways side by side, and the same on SmolLM2-135M (generation tokens/s, one training step).

The three ways, chosen by environment variables in one process:

- ``torch`` = ``MODULORA_COMPILE=0``: the plugins' plain torch code, eagerly;
- ``compiled`` = ``MODULORA_COMPILE=1 MODULORA_NATIVE=0``: that code through ``torch.compile``;
- ``native`` = the default on a CPU: the C kernels of :mod:`modulora_core.native` where a plugin has one.

Materialize: GB/s of float32 weight written, against ``copy_`` of a float32 tensor of the same size (the
memory-copy ceiling). Decode: a one-token forward of the frozen base (no LoRA) against dense ``F.linear``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext

import torch

import modulora
from modulora_core import kernels, native

MODES = {"torch": {kernels.ENV: "0"}, "compiled": {kernels.ENV: "1", native.ENV: "0"}, "native": {}}
KERNEL_PRESETS = "rtn-4bit,nf4,optq-4bit,quip#-2bit"
SMOLLM2_PRESETS = ("rtn-4bit", "nf4")  # no calibration: quick to quantize
DECODE_REPS = 15  # rounds of the decode steps and the dense layer (fast: more rounds, steadier medians)


@contextmanager
def mode_env(mode: str) -> Iterator[None]:
    """The environment of ``mode`` (see :data:`MODES`), restored afterwards."""
    keys = (kernels.ENV, native.ENV)
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(MODES[mode])
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def interleaved(fns: dict[str, tuple[str | None, Callable[[], object], int]]) -> dict[str, list[float]]:
    """Seconds per call of each ``name: (mode, fn, reps)``, one per round: one warm-up call each (which also
    compiles), then rounds that time every fn once, in alternating order (so neighbours in ``fns`` stay
    neighbours in time, and drift in the machine's load hits them alike); fn ``name`` is timed in the first
    ``reps`` rounds. ``mode``: the environment of :data:`MODES` it runs in (None: as it is)."""
    def call(mode: str | None, fn: Callable[[], object]) -> float:
        with mode_env(mode) if mode else nullcontext():
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0

    for mode, fn, _ in fns.values():
        call(mode, fn)
    ts: dict[str, list[float]] = {k: [] for k in fns}
    for rnd in range(max(r for _, _, r in fns.values())):
        names = [k for k in fns if rnd < fns[k][2]]
        for k in names if rnd % 2 == 0 else names[::-1]:
            ts[k].append(call(fns[k][0], fns[k][1]))
    return ts


def paired(num: list[float], den: list[float]) -> float:
    """Median over the rounds both were timed in of ``num / den``: a ratio measured side by side."""
    return statistics.median(a / b for a, b in zip(num, den, strict=False))


def kernel_rows(preset: str, dim: int, reps: int, modes: tuple[str, ...]) -> dict:
    """Materialize GB/s and one-token decode ms of a ``dim x dim`` weight, per mode; dense and copy figures,
    all in interleaved rounds (:func:`interleaved`), each decode next to the dense layer and each materialize
    next to the copy; the ratios are medians of the per-round ratios (:func:`paired`)."""
    torch.manual_seed(0)
    w = torch.randn(dim, dim) * dim**-0.5
    bq = modulora.get_preset(preset)
    packed = bq.quantize(w, torch.eye(dim) if bq.capabilities().needs_calibration else None)
    q, x = bq.quantizer, torch.randn(1, dim)
    fast = bq.capabilities().fast_path
    decode = (lambda: q.matmul(x, packed)) if fast else (lambda: q.matmul_small(x, packed))
    gb = dim * dim * 4 / 1e9
    src, dst = torch.randn(dim, dim), torch.empty(dim, dim)

    def mat() -> torch.Tensor:
        return q.materialize(packed, dtype=torch.float32)

    order = modes[::-1]  # native first: next to its reference
    fns: dict[str, tuple[str | None, Callable[[], object], int]] = {
        "dense": (None, lambda: torch.nn.functional.linear(x, w), DECODE_REPS)}
    with torch.no_grad():
        for mode in order:
            with mode_env(mode):
                if fast or decode() is not None:
                    fns[f"decode_{mode}"] = (mode, decode, DECODE_REPS)
        fns["copy"] = (None, lambda: dst.copy_(src), reps)
        for mode in order:
            fns[f"materialize_{mode}"] = (mode, mat, reps)
        if "torch" in modes:
            fns["materialize_linear"] = ("torch", lambda: torch.nn.functional.linear(x, mat()), reps)
        t = interleaved(fns)
    med = {k: statistics.median(v) for k, v in t.items()}
    row: dict = {"quantizer": preset, "dim": dim, "dense_ms": med["dense"] * 1e3, "copy_gbps": gb / med["copy"],
                 "materialize_linear_ms": med["materialize_linear"] * 1e3 if "materialize_linear" in t else None,
                 "materialize_linear_vs_dense": paired(t["materialize_linear"], t["dense"])
                 if "materialize_linear" in t else None}
    for mode in modes:
        row[f"materialize_gbps_{mode}"] = gb / med[f"materialize_{mode}"]
        row[f"materialize_vs_copy_{mode}"] = paired(t["copy"], t[f"materialize_{mode}"])
        dec = t.get(f"decode_{mode}")
        row[f"decode_ms_{mode}"] = statistics.median(dec) * 1e3 if dec else None
        row[f"decode_vs_dense_{mode}"] = paired(dec, t["dense"]) if dec else None
    return row


def smollm2_rows(presets: tuple[str, ...], new_tokens: int, reps: int) -> list[dict]:
    """SmolLM2-135M: greedy generation tokens/s (``new_tokens`` after a short prompt) and one training step
    (batch 2 x 128, LoRA r=8) per preset, torch vs native, with the dense model's generation in the same
    interleaved rounds (its tokens/s: the median over every preset's rounds)."""
    from transformers import AutoModelForCausalLM

    from modulora.finetune.pretrained import smollm2_dir

    path = str(smollm2_dir())
    ids = torch.arange(100, 116)[None]  # a 16-token prompt
    batch = torch.randint(100, 4000, (2, 128), generator=torch.Generator().manual_seed(0))

    def generate(model: torch.nn.Module) -> Callable[[], None]:
        def gen() -> None:
            model.eval()
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return gen

    def train_step(model: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            model.train()
            model.zero_grad(set_to_none=True)
            model(input_ids=batch, labels=batch).loss.backward()
        return step

    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    rows, dense_s = [], []
    for preset in presets:
        model = modulora.load(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), preset)
        fns: dict[str, tuple[str | None, Callable[[], object], int]] = {"dense": (None, generate(dense), reps)}
        for mode in ("torch", "native"):
            fns[f"gen_{mode}"] = (mode, generate(model), reps)
            fns[f"train_{mode}"] = (mode, train_step(model), max(1, reps - 1))
        t = {k: statistics.median(v) for k, v in interleaved(fns).items()}
        dense_s.append(t["dense"])
        rows.append({"model": preset, **{f"tokens_per_s_{m}": new_tokens / t[f"gen_{m}"] for m in ("torch", "native")},
                     **{f"train_step_s_{m}": t[f"train_{m}"] for m in ("torch", "native")}})
    return [{"model": "dense", "tokens_per_s": new_tokens / statistics.median(dense_s)}, *rows]


def _ratio_cell(r: dict, value: str, ratio: str, fmt: str = ".2f") -> str:
    return "-" if r.get(value) is None else f"{r[value]:{fmt}} ({r[ratio]:.2f}x)"


def _cell(v: float | None, d: float | None = None, fmt: str = ".1f") -> str:
    if v is None:
        return "-"
    return f"{v:{fmt}}" + ("" if d is None else f" ({v / d:.2f}x)")


# issue 14's goals for the native kernels: materialize / ceiling at least, decode / dense at most
MATERIALIZE_GOAL = {"rtn-4bit": 0.5, "nf4": 0.5, "optq-4bit": 0.5, "quip#-2bit": 0.2}
DECODE_GOAL = {"rtn-4bit": 1.0, "nf4": 1.0, "optq-4bit": 1.0, "quip#-2bit": 2.0}


def goals(rows: list[dict]) -> str:
    """One line per goal of issue 14 that a measured quantizer has: the native figure, the bound, met or not."""
    out = []
    for r in rows:
        p = r["quantizer"]
        if p in MATERIALIZE_GOAL and "materialize_gbps_native" in r:
            v = r["materialize_vs_copy_native"]
            out.append(f"{p} materialize {v:.2f} of the ceiling (goal >= {MATERIALIZE_GOAL[p]}: "
                       f"{'met' if v >= MATERIALIZE_GOAL[p] else 'missed'})")
        if p in DECODE_GOAL and r.get("decode_ms_native") is not None:
            v = r["decode_vs_dense_native"]
            out.append(f"{p} decode {v:.2f}x dense (goal <= {DECODE_GOAL[p]}x: "
                       f"{'met' if v <= DECODE_GOAL[p] else 'missed'})")
    return "Issue 14's goals (set at 4096x4096), native: " + "; ".join(out) + "." if out else ""


def report(a: argparse.Namespace, rows: list[dict], lm: list[dict]) -> str:
    """The markdown body of the ``kernels`` section."""
    modes = [m for m in MODES if f"materialize_gbps_{m}" in rows[0]] if rows else []
    mat = [f"| {r['quantizer']} | " + " | ".join(f"{r[f'materialize_gbps_{m}']:.2f}" for m in modes)
           + f" | {r['copy_gbps']:.2f} | "
           + " | ".join(f"{r[f'materialize_vs_copy_{m}']:.2f}" for m in modes) + " |" for r in rows]
    dec = [f"| {r['quantizer']} | {r['dense_ms']:.2f} | {_ratio_cell(r, 'materialize_linear_ms', 'materialize_linear_vs_dense', '.1f')} | "
           + " | ".join(_ratio_cell(r, f"decode_ms_{m}", f"decode_vs_dense_{m}") for m in modes) + " |" for r in rows]
    body = (
        f"One {a.dim}x{a.dim} weight, float32, {torch.get_num_threads()} torch thread(s). Ways: torch = "
        "`MODULORA_COMPILE=0` (the plugins' torch code, eager); compiled = `MODULORA_COMPILE=1 MODULORA_NATIVE=0` "
        "(`torch.compile` of that code; the first call, which compiles, is a warm-up); native = the default on a "
        "CPU, the C kernels of `modulora_core/native_kernels.c`. Every figure of a quantizer comes from the same "
        f"interleaved rounds (each call timed once a round, in alternating order); medians of {a.reps} "
        f"(materialize, copy) and {DECODE_REPS} (decode, dense) calls. The machine was shared with other work "
        "while this ran: read the ratios, measured side by side, more than the absolute figures.\n\n"
        "Materialize: GB/s of float32 weight written (a fresh tensor each call, as in a training step), against "
        "`copy_` into a preallocated float32 tensor of the same size (the ceiling); the fractions of the ceiling "
        "are medians of the per-round ratios (each materialize timed next to the copy), as are the decode "
        "ratios below (each decode next to the dense layer).\n\n"
        "| quantizer | " + " | ".join(f"{m} GB/s" for m in modes) + " | copy GB/s | "
        + " | ".join(f"{m} / ceiling" for m in modes) + " |\n|" + "---|" * (2 + 2 * len(modes)) + "\n"
        + "\n".join(mat) + "\n\n"
        "Decode step: a one-token forward of the frozen base, ms (times the dense layer). Decode path = "
        "`matmul_small` from the packed form (QuIP#: its fast path, which rotates x and, natively, dots each "
        "E8P codeword with its 8 inputs without decoding rows).\n\n"
        "| quantizer | dense F.linear ms | materialize + F.linear ms | " + " | ".join(f"decode {m} ms" for m in modes)
        + " |\n|" + "---|" * (3 + len(modes)) + "\n" + "\n".join(dec) + "\n\n" + goals(rows) + "\n"
    )
    if lm:
        d = lm[0]["tokens_per_s"]
        lines = [f"| {r['model']} | {_cell(r['tokens_per_s_torch'], None)} | {_cell(r['tokens_per_s_native'], None)} "
                 f"({r['tokens_per_s_native'] / r['tokens_per_s_torch']:.1f}x; {r['tokens_per_s_native'] / d:.2f} of "
                 f"dense) | {r['train_step_s_torch']:.2f} | {r['train_step_s_native']:.2f} |" for r in lm[1:]]
        body += (
            f"\nSmolLM2-135M-Instruct, every decoder linear quantized (`modulora.load`, LoRA r=8): greedy generation of "
            f"{a.new_tokens} tokens after a 16-token prompt (tokens/s; dense float32 model: {d:.1f} tokens/s), and one "
            "training step (forward + backward, batch 2 x 128), s. Medians of "
            f"{a.lm_reps} interleaved rounds (generation) and {max(1, a.lm_reps - 1)} (training step); the dense "
            "model's generation ran in the same rounds.\n\n| preset | generate torch tok/s | generate native tok/s | train step torch s | "
            "train step native s |\n|---|---|---|---|---|\n" + "\n".join(lines) + "\n")
    return body


def run_kernels(a: argparse.Namespace) -> None:
    """The ``--kernels`` report (see the module docstring); writes docs/benchmarks.md unless ``--no-write``."""
    modes = tuple(m for m in MODES if m != "compiled" or not a.no_compile)
    rows = [kernel_rows(p.strip(), a.dim, a.reps, modes) for p in a.presets.split(",") if p.strip()]
    lm = smollm2_rows(SMOLLM2_PRESETS, a.new_tokens, a.lm_reps) if a.lm_reps else []
    body = report(a, rows, lm)
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        cmd = ("python -m benchmarks.bench_layer --kernels" + (f" --dim {a.dim}" if a.dim != 4096 else "")
               + (" --no-compile" if a.no_compile else "") + (f" --lm-reps {a.lm_reps}" if a.lm_reps != 3 else "")
               + (f" --new-tokens {a.new_tokens}" if a.new_tokens != 32 else ""))
        write_data("kernels", cmd, {"layer": rows, "smollm2": lm})
        write_section("kernels", "Kernels: materialize and the one-token decode step (torch, compiled, native)",
                      cmd, body)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """``--kernels``' own options."""
    ap.add_argument("--new-tokens", type=int, default=32, help="--kernels: tokens generated per SmolLM2 run")
    ap.add_argument("--lm-reps", type=int, default=3, help="--kernels: SmolLM2 runs per figure (0: skip SmolLM2)")
    ap.add_argument("--no-compile", action="store_true", help="--kernels: skip the torch.compile column")
