"""The GPU check, one command (about 5-8 minutes on one GPU): the CUDA tests, then a 7B-shaped training step.

    python -m benchmarks.gpu                  # needs torch with CUDA; writes the GPU section of docs/benchmarks.md
    python -m benchmarks.gpu --no-tests       # the measurements only
    python -m benchmarks.gpu --device cpu --tiny --no-tests --no-write   # a smoke test of this script

1. ``pytest -m cuda`` (tests/test_cuda.py) and the conformance kit's CUDA cases (the kit adds ``cuda`` to its
   devices when one is there).
2. A Llama-7B-shaped model (or ``--layers`` fewer blocks, e.g. when the GPU is small) with random weights in
   bfloat16, batch 1, ``--seq`` 512 tokens: peak CUDA memory and time of one forward+backward+AdamW step of LoRA
   r=8 on every decoder linear, for ``quip#-2bit``, ``optq-4bit`` and ``nf4`` (ModuLoRA), PEFT + bitsandbytes
   QLoRA (when bitsandbytes is installed) and dense LoRA. Random weights: each distinct shape is quantized
   once and its packed tensors are copied into every block, since quantizing 6.7B random numbers tells
   nothing and takes long; memory and time do not depend on the values.
3. Materialize throughput of each quantizer on a 4096x11008 weight against device-to-device ``copy_``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from torch import nn

import modulora
from modulora_core import PackedWeight, QuantizedLinear

PRESETS = ("quip#-2bit", "optq-4bit", "nf4")
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def llama(layers: int, tiny: bool, dtype: torch.dtype, device: str) -> nn.Module:
    """A Llama-2-7B-shaped causal LM (``layers`` blocks) with random weights; ``tiny``: 256 wide, for smoke tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dims = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4) if tiny else {}
    cfg = LlamaConfig(num_hidden_layers=layers, vocab_size=32000, **dims)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype)


def quantize_shared(model: nn.Module, preset: str) -> None:
    """Replace every decoder linear by a QuantizedLinear; one quantization per distinct shape, copied."""
    bq = modulora.get_preset(preset)
    cache: dict[tuple[int, int], PackedWeight] = {}
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in TARGETS]
    for name in names:
        lin = model.get_submodule(name)
        shape = tuple(lin.weight.shape)
        if shape not in cache:
            w = lin.weight.detach().float()
            h = torch.eye(shape[1], device=w.device) if bq.capabilities().needs_calibration else None
            cache[shape] = bq.quantize(w, h)
        p = cache[shape]
        packed = type(p)(p.family, p.config, p.shape, lin.weight.dtype, {k: v.clone() for k, v in p.tensors.items()},
                         p.format_version, dict(p.extra))
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, QuantizedLinear(packed, bq.quantizer, preset=bq.name))


def qlora(model: nn.Module, device: str) -> nn.Module:
    """PEFT + bitsandbytes QLoRA's base: every decoder linear as a bnb ``Linear4bit`` (nf4, bf16 compute)."""
    import bitsandbytes as bnb

    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            q = bnb.nn.Linear4bit(m.in_features, m.out_features, bias=False, compute_dtype=torch.bfloat16,
                                  quant_type="nf4")
            q.weight = bnb.nn.Params4bit(m.weight.data.cpu(), requires_grad=False, quant_type="nf4")
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, q.to(device))  # bnb quantizes on the move
    return model


def train_step(model: nn.Module, seq: int, device: str, reps: int) -> tuple[float, float]:
    """``(peak MiB, median seconds)`` of forward+backward+AdamW steps with LoRA r=8 on every decoder linear."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(TARGETS)),
                           autocast_adapter_dtype=False)  # LoRA in bf16, like the base's compute
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 32000, (1, seq), device=device)
    times = []
    cuda = device.startswith("cuda")
    for i in range(reps + 1):
        if cuda:
            torch.cuda.synchronize()
            if i == 1:
                torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan")
    return peak, statistics.median(times)


def throughput(preset: str, device: str, reps: int) -> tuple[float, float]:
    """``(materialize GB/s, copy GB/s)`` of a 4096x11008 bfloat16 weight on ``device``."""
    bq = modulora.get_preset(preset)
    w = torch.randn(4096, 11008, device=device) * 0.02
    packed = bq.quantize(w, torch.eye(11008, device=device) if bq.capabilities().needs_calibration else None)
    src = w.to(torch.bfloat16)
    dst = torch.empty_like(src)

    def timed(fn) -> float:
        fn()
        ts = []
        for _ in range(reps):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    gb = src.numel() * 2 / 1e9
    return (gb / timed(lambda: bq.quantizer.materialize(packed, dtype=torch.bfloat16)),
            gb / timed(lambda: dst.copy_(src)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--layers", type=int, default=32, help="decoder blocks (32 = Llama-2-7B)")
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="256-wide blocks: a smoke test of the script")
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("benchmarks.gpu needs torch with CUDA and a GPU (torch.cuda.is_available() is False)")
    if not a.no_tests:
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/test_cuda.py"]) or \
            subprocess.call([sys.executable, "-m", "pytest", "-q", "tests/test_conformance.py", "-k",
                             "materialize_shape_dtype_device"])  # the kit adds cuda to its devices
        if rc:
            sys.exit(f"the CUDA tests failed (pytest exit {rc})")
    rows = []
    configs = [*PRESETS, "qlora", "dense"]
    for c in configs:
        model = llama(a.layers, a.tiny, torch.bfloat16, a.device)
        try:
            if c == "qlora":
                model = qlora(model, a.device)
            elif c != "dense":
                quantize_shared(model, c)
        except ImportError as e:
            print(f"skipping {c}: {e}")
            continue
        peak, sec = train_step(model, a.seq, a.device, a.reps)
        rows.append((c, peak, sec))
        print(f"{c}: peak {peak:.0f} MiB, {sec * 1e3:.0f} ms/step", flush=True)
        del model
        if a.device.startswith("cuda"):
            torch.cuda.empty_cache()
    dense = dict((c, s) for c, _, s in rows).get("dense")
    tput = [(p, *throughput(p, a.device, a.reps)) for p in PRESETS]
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else a.device
    body = (f"{name}; Llama-2-7B shapes, {a.layers} blocks, random weights, bfloat16, batch 1, seq {a.seq}, "
            "LoRA r=8 on every decoder linear (bfloat16), AdamW; median of "
            f"{a.reps} steps after a warm-up.\n\n| configuration | peak CUDA MiB | ms / step | time vs dense LoRA |\n"
            "|---|---|---|---|\n" + "\n".join(
                f"| {c} | {p:.0f} | {s * 1e3:.0f} | {s / dense:.2f} |" if dense else f"| {c} | {p:.0f} | {s * 1e3:.0f} | - |"
                for c, p, s in rows)
            + "\n\nMaterialize of a 4096x11008 weight to bfloat16 against device `copy_` of the same bytes:\n\n"
            "| quantizer | materialize GB/s | copy GB/s | fraction |\n|---|---|---|---|\n"
            + "\n".join(f"| {p} | {m:.1f} | {c:.1f} | {m / c:.2f} |" for p, m, c in tput) + "\n")
    print(body)
    if not a.no_write:
        from benchmarks.report import write_section

        write_section("gpu", "GPU: a 7B-shaped training step", "python -m benchmarks.gpu", body)


if __name__ == "__main__":
    main()
