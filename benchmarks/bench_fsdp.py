"""Per-process peak memory of FSDP2 (issue 16) against one process and against DDP, with the planner.

    python -m benchmarks.bench_fsdp [--model llama-1.5b] [--quantizers rtn-2bit,rtn-4bit] [--write]
    python -m benchmarks.bench_fsdp --calibrate     # the process group's runtime (planning.sharding)

A random Llama (``bench_memory.RANDOM_MODELS``), every decoder linear quantized, PEFT LoRA r=8 on all of them,
AdamW, global batch 2 × seq 256: one process (batch 2), and 2 processes under torchrun with gloo (batch 1
each), DDP (the packed base not broadcast, as ``modulora finetune`` runs it) and FSDP2
(``modulora_core.fsdp.shard_model``). Each process builds the model (the same seed), runs a warm-up step, then
its high-water mark of RSS is reset and one more step measured: the peak of training, not of loading (every
process builds the whole packed model before sharding it). The prediction is
``plan(..., batch_size=per-process batch, world_size=N, fsdp=...)``. Also the planner's per-GPU figure for
LLaMA-2-70B on 2 and 4 GPUs (bfloat16, batch 1 × seq 128, the paper's setting).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
from typing import Any

import torch

from .bench_memory import _status_bytes, build, lora_config, model_config

GiB, MiB = 1 << 30, 1 << 20
SEQ, GLOBAL_BATCH = 256, 2
MODES = {"one": (1, False), "ddp": (2, False), "fsdp": (2, True)}


def worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One process of a configuration (under torchrun for ``ddp``/``fsdp``); rank 0 returns every rank's peak."""
    import torch.distributed as dist

    world, fsdp = MODES[spec["mode"]]
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    model = build(spec["model"], spec["quantizer"], None, 8)
    model.train()
    if fsdp:
        from modulora_core.fsdp import shard_model

        shard_model(model)
    elif world > 1:
        from modulora.finetune.train import exclude_frozen_from_ddp

        exclude_frozen_from_ddp(model)
        model = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=False,
                                                          broadcast_buffers=False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    per = GLOBAL_BATCH // world
    vocab = model_config(spec["model"]).vocab_size
    ids = torch.randint(vocab, (GLOBAL_BATCH, SEQ), generator=torch.Generator().manual_seed(0))[
        rank * per:(rank + 1) * per]

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: optimizer states, thread pools, allocator arenas
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    if world > 1:
        dist.barrier()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    step()
    mine = {"hwm": _status_bytes("VmHWM")}
    if world == 1:
        return {"hwm": [mine["hwm"]]}
    every: list[Any] = [None] * world
    dist.all_gather_object(every, mine)
    dist.destroy_process_group()
    return {"hwm": [e["hwm"] for e in every]} if rank == 0 else None


def measure(model: str, quantizer: str, mode: str, port: int = 29581) -> dict[str, Any]:
    """Run one configuration in fresh processes; returns ``{"hwm": [bytes per process]}``."""
    spec = json.dumps({"model": model, "quantizer": quantizer, "mode": mode})
    world = MODES[mode][0]
    launcher = [sys.executable] if world == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   "--nproc_per_node", str(world), "--master_port", str(port)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0", OMP_NUM_THREADS="1",
               PYTHONWARNINGS="ignore")
    p = subprocess.run([*launcher, "-m", "benchmarks.bench_fsdp", "--worker", spec], capture_output=True,
                       text=True, env=env)
    if p.returncode:
        raise RuntimeError(p.stderr[-3000:])
    return json.loads([ln for ln in p.stdout.splitlines() if ln.startswith("{")][-1])


def predict(model: str, quantizer: str, mode: str, runtime_bytes: int | None = None) -> Any:
    """The planner's per-process prediction of one configuration."""
    from modulora.planning import plan

    world, fsdp = MODES[mode]
    return plan(model_config(model), quantizer, batch_size=GLOBAL_BATCH // world, seq_len=SEQ,
                lora=lora_config(8), dtype="float32", device="cpu", world_size=world, fsdp=fsdp,
                runtime_bytes=runtime_bytes)


def paper_70b() -> list[dict[str, Any]]:
    """The planner's per-GPU peak for LLaMA-2-70B, 2-bit and 4-bit, on 1, 2 and 4 GPUs of 24 GB (FSDP2)."""
    from modulora.planning import plan

    out = []
    for q in ("rtn-2bit", "rtn-4bit"):
        for n in (1, 2, 4):
            p = plan("llama-2-70b", q, batch_size=1, seq_len=128, dtype="bfloat16", device="cuda",
                     world_size=n, fsdp=n > 1, budget="24GB", lora=lora_config(8))
            out.append({"quantizer": q, "gpus": n, "per_gpu_bytes": p.total, "fits_24gb": p.fits})
    return out


def run(model: str, quantizers: list[str]) -> tuple[str, dict[str, Any]]:
    """Measure and predict every configuration; the markdown body and the raw rows."""
    rows = []
    lines = ["| quantizer | run | batch per process | predicted GiB | measured peak RSS GiB (per process) | error |",
             "|---|---|---|---|---|---|"]
    for q in quantizers:
        for mode in MODES:
            m = measure(model, q, mode)
            p = predict(model, q, mode)
            peak = max(m["hwm"])
            err = 100 * (p.total - peak) / peak
            rows.append({"quantizer": q, "mode": mode, "measured": m["hwm"], "predicted": p.total,
                         "components": {c.key: c.nbytes for c in p.components if c.counted}})
            label = {"one": "1 process", "ddp": "2 processes, DDP", "fsdp": "2 processes, FSDP2"}[mode]
            lines.append(f"| {q} | {label} | {GLOBAL_BATCH // MODES[mode][0]} | {p.total / GiB:.2f} | "
                         f"{' / '.join(f'{h / GiB:.2f}' for h in m['hwm'])} | {err:+.1f}% |")
            print(lines[-1], flush=True)
    paper = paper_70b()
    lines += ["", "Planner, LLaMA-2-70B, bfloat16, batch 1 × seq 128, LoRA r=8 on every linear, per GPU "
              "(FSDP2 across the GPUs):", "", "| quantizer | 1 GPU | 2 GPUs | 4 GPUs |", "|---|---|---|---|"]
    for q in ("rtn-2bit", "rtn-4bit"):
        cells = [f"{r['per_gpu_bytes'] / 1e9:.1f} GB" + ("" if r["fits_24gb"] else " (> 24 GB)")
                 for r in paper if r["quantizer"] == q]
        lines.append(f"| {q} | {' | '.join(cells)} |")
    return "\n".join(lines), {"rows": rows, "llama_2_70b": paper}


def calibrate() -> int:
    """The process group's runtime: a tiny model's FSDP2 peak RSS minus its prediction without it."""
    from modulora.planning.sharding import DISTRIBUTED_RUNTIME

    m = max(measure("tiny", "rtn-4bit", "fsdp")["hwm"])
    p = predict("tiny", "rtn-4bit", "fsdp").total - DISTRIBUTED_RUNTIME["cpu"]
    print(f"process group runtime: {(m - p) / MiB:.1f} MiB")
    return m - p


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-0.5b")
    ap.add_argument("--quantizers", default="rtn-2bit,rtn-4bit")
    ap.add_argument("--write", action="store_true", help="write docs/benchmarks.md and docs/data/fsdp.json")
    ap.add_argument("--calibrate", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        torch.set_num_threads(1)
        r = worker(json.loads(a.worker))
        if r is not None:
            print(json.dumps(r), flush=True)
        return
    if a.calibrate:
        calibrate()
        return
    body, data = run(a.model, a.quantizers.split(","))
    if a.write:
        from .report import write_data, write_section

        cmd = f"python -m benchmarks.bench_fsdp --model {a.model} --quantizers {a.quantizers} --write"
        write_data("fsdp", cmd, data)
        write_section("fsdp", f"FSDP2: per-process peak memory ({a.model}, 2 processes)", cmd,
                      f"{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0]}\n{body}")


if __name__ == "__main__":
    main()
