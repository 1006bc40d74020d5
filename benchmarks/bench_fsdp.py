"""Per-process peak memory of FSDP2 (issue 16) against one process and against DDP, with the planner.

    python -m benchmarks.bench_fsdp [--model llama-1.5b] [--quantizers rtn-2bit,rtn-4bit] [--cache m.json] [--write]
    python -m benchmarks.bench_fsdp --calibrate     # the process group's runtime (planning.sharding)

A random Llama (``bench_memory.RANDOM_MODELS``), every decoder linear quantized, PEFT LoRA r=8 on all of them,
AdamW, global batch 2 × seq 256: one process (batch 2), and 2 processes under torchrun with gloo (batch 1
each), DDP (the packed base not broadcast, as ``modulora finetune`` runs it) and FSDP2
(``modulora_core.fsdp.shard_model``). Each process builds the model (the same seed), runs a warm-up step, then
its high-water mark of RSS is reset and one more step measured: the peak of training, not of loading (every
process builds the whole packed model before sharding it). The prediction is
``plan(..., batch_size=per-process batch, world_size=N, fsdp=...)``. Also the planner's per-GPU figure for
LLaMA-2-70B on 2 and 4 GPUs (bfloat16, batch 1 × seq 128, the paper's setting).

Loading before sharding: the model is quantized and saved once; each of 2 processes loads that checkpoint
(``modulora.load``: a memory map of the file), adds LoRA and shards it; measured is each process's peak RSS
from start to sharded, and its RSS after, with ``shard_model`` releasing the checkpoint's pages unit by unit
(``release_file_pages``) and without (the pages read stay resident until the last unit is sharded).
``--cache`` keeps the measurements (and reuses them: the planner can be rechecked without measuring again).
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
LOAD_MODES = ("load-released", "load-kept")  # loading then sharding, checkpoint pages released or kept


def load_worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One of 2 processes: load the saved checkpoint, add LoRA, shard; rank 0 returns every rank's peak."""
    import torch.distributed as dist

    import modulora
    import modulora_core.fsdp as fsdp

    from .bench_memory import _peft_lora

    dist.init_process_group("gloo")
    if spec["mode"] == "load-kept":
        fsdp.release_file_pages = lambda tensors: 0  # the pages stay until the mapping goes
    model = _peft_lora(modulora.load(spec["checkpoint"], lora=None), 8)
    loaded = _status_bytes("VmRSS")
    fsdp.shard_model(model)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    mine = {"hwm": _status_bytes("VmHWM"), "loaded": loaded, "after": _status_bytes("VmRSS")}
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    rank = dist.get_rank()
    dist.destroy_process_group()
    return {k: [e[k] for e in every] for k in mine} if rank == 0 else None


def worker(spec: dict[str, Any]) -> dict[str, Any] | None:
    """One process of a configuration (under torchrun for ``ddp``/``fsdp``); rank 0 returns every rank's peak."""
    import torch.distributed as dist

    if spec["mode"] in LOAD_MODES:
        return load_worker(spec)

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


def measure(model: str, quantizer: str, mode: str, port: int = 29581, checkpoint: str | None = None
            ) -> dict[str, Any]:
    """Run one configuration in fresh processes; returns ``{"hwm": [bytes per process]}``."""
    spec = json.dumps({"model": model, "quantizer": quantizer, "mode": mode, "checkpoint": checkpoint})
    world = 2 if mode in LOAD_MODES else MODES[mode][0]
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


def save_checkpoint(model: str, quantizer: str, directory: str) -> str:
    """Quantize the random model once and save it (``modulora.save_quantized``) in a fresh process."""
    code = ("import sys, modulora; from benchmarks.bench_memory import random_quantized_llama, model_config; "
            "modulora.save_quantized(random_quantized_llama(model_config(sys.argv[1]), sys.argv[2], None), sys.argv[3])")
    subprocess.run([sys.executable, "-c", code, model, quantizer, directory], check=True, capture_output=True,
                   env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore"))
    return directory


def cached(cache: dict[str, Any], key: str, fn: Any) -> Any:
    """``cache[key]``, measured by ``fn()`` first if missing."""
    if key not in cache:
        cache[key] = fn()
    return cache[key]


def load_rows(model: str, quantizers: list[str], cache: dict[str, Any]) -> list[str]:
    """The loading table: per-process peak from start to sharded, checkpoint pages released or kept."""
    import tempfile

    lines = ["", "Loading a saved checkpoint and sharding it, per process (2 processes; the ranks' figures "
             "agree within 1%, the larger is shown):", "",
             "| quantizer | checkpoint pages | RSS loaded GiB | peak RSS to sharded GiB | RSS sharded GiB |",
             "|---|---|---|---|---|"]
    for q in quantizers:
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = None
            for mode in LOAD_MODES:
                def go(mode: str = mode, q: str = q) -> dict[str, Any]:
                    nonlocal ckpt
                    ckpt = ckpt or save_checkpoint(model, q, os.path.join(tmp, "base"))
                    return measure(model, q, mode, checkpoint=ckpt)
                m = cached(cache, f"{model}|{q}|{mode}", go)
                how = "released unit by unit" if mode == "load-released" else "kept until all are sharded"
                lines.append(f"| {q} | {how} | {max(m['loaded']) / GiB:.2f} | {max(m['hwm']) / GiB:.2f} | "
                             f"{max(m['after']) / GiB:.2f} |")
                print(lines[-1], flush=True)
    return lines


def run(model: str, quantizers: list[str], cache: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """Measure and predict every configuration; the markdown body and the raw rows."""
    cache = {} if cache is None else cache
    rows = []
    lines = ["| quantizer | run | batch per process | predicted GiB | measured peak RSS GiB (per process) | error |",
             "|---|---|---|---|---|---|"]
    for q in quantizers:
        for mode in MODES:
            m = cached(cache, f"{model}|{q}|{mode}", lambda q=q, mode=mode: measure(model, q, mode))
            p = predict(model, q, mode)
            peak = max(m["hwm"])
            err = 100 * (p.total - peak) / peak
            rows.append({"quantizer": q, "mode": mode, "measured": m["hwm"], "predicted": p.total,
                         "components": {c.key: c.nbytes for c in p.components if c.counted}})
            label = {"one": "1 process", "ddp": "2 processes, DDP", "fsdp": "2 processes, FSDP2"}[mode]
            lines.append(f"| {q} | {label} | {GLOBAL_BATCH // MODES[mode][0]} | {p.total / GiB:.2f} | "
                         f"{' / '.join(f'{h / GiB:.2f}' for h in m['hwm'])} | {err:+.1f}% |")
            print(lines[-1], flush=True)
    lines += load_rows(model, quantizers, cache)
    paper = paper_70b()
    lines += ["", "Planner, LLaMA-2-70B, bfloat16, batch 1 × seq 128, LoRA r=8 on every linear, per GPU "
              "(FSDP2 across the GPUs):", "", "| quantizer | 1 GPU | 2 GPUs | 4 GPUs |", "|---|---|---|---|"]
    for q in ("rtn-2bit", "rtn-4bit"):
        cells = [f"{r['per_gpu_bytes'] / 1e9:.1f} GB" + ("" if r["fits_24gb"] else " (> 24 GB)")
                 for r in paper if r["quantizer"] == q]
        lines.append(f"| {q} | {' | '.join(cells)} |")
    loads = {k: v for k, v in cache.items() if k.split("|")[-1] in LOAD_MODES}
    return "\n".join(lines), {"rows": rows, "loading": loads, "llama_2_70b": paper}


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
    ap.add_argument("--cache", help="a JSON file of measurements: reused, and new ones added")
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
    cache = json.loads(open(a.cache).read()) if a.cache and os.path.exists(a.cache) else {}
    try:
        body, data = run(a.model, a.quantizers.split(","), cache)
    finally:
        if a.cache:
            with open(a.cache, "w") as f:
                json.dump(cache, f)
    if a.write:
        from .report import write_data, write_section

        cmd = (f"python -m benchmarks.bench_fsdp --model {a.model} --quantizers {a.quantizers}"
               + (f" --cache {a.cache}" if a.cache else "") + " --write")
        write_data("fsdp", cmd, data)
        write_section("fsdp", f"FSDP2: per-process peak memory ({a.model}, 2 processes)", cmd,
                      f"{__doc__.split(chr(10) + chr(10), 1)[1].split('    python')[0]}\n{body}")


if __name__ == "__main__":
    main()
