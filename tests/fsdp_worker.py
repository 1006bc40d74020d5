"""The training run of ``tests/test_fsdp.py``: ``torchrun --nproc_per_node 2 tests/fsdp_worker.py TINY OUT
PRESET...`` trains LoRA over each preset's quantized tiny Llama for 10 steps under FSDP2 and writes
``OUT/PRESET.json`` (losses, packed bytes per rank) and the gathered adapter ``OUT/PRESET/`` (PEFT format).
``train(tiny, preset, shard=False)`` is the one-process reference with the same global batch."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

STEPS, GLOBAL_BATCH, SEQ = 10, 4, 16


def build(tiny: Path, preset: str):
    """The quantized tiny Llama with PEFT LoRA (r=4) on every quantized module, the same on every rank."""
    from transformers import AutoModelForCausalLM

    import modulora

    model = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    cal = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    from peft import get_peft_model

    torch.manual_seed(0)
    base = modulora.load(model, preset, calibration=cal, lora=None)
    torch.manual_seed(0)
    lora = modulora.default_lora(base, r=4, alpha=8)
    return get_peft_model(base, lora)


def train(tiny: Path, preset: str, *, shard: bool) -> dict:
    """10 Adam steps on random tokens; returns the losses (the mean over the global batch) and packed bytes."""
    import torch.distributed as dist

    from modulora_core.fsdp import local_packed_bytes, shard_model

    model = build(tiny, preset)
    full_bytes = local_packed_bytes(model)
    rank, world = (dist.get_rank(), dist.get_world_size()) if shard else (0, 1)
    if shard:
        shard_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    g = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    losses = []
    per = GLOBAL_BATCH // world
    for _ in range(STEPS):
        ids = torch.randint(3, vocab, (GLOBAL_BATCH, SEQ), generator=g)[rank * per:(rank + 1) * per]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        logged = loss.detach().clone()
        if shard:
            dist.all_reduce(logged)
            logged /= world
        losses.append(logged.item())
    return {"losses": losses, "full_packed_bytes": full_bytes, "local_packed_bytes": local_packed_bytes(model),
            "model": model}


def main(tiny: str, out: str, presets: list[str]) -> None:
    import torch.distributed as dist

    from modulora_core.fsdp import full_trainable_state_dict

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    for preset in presets:
        r = train(Path(tiny), preset, shard=True)
        model = r.pop("model")
        sd = full_trainable_state_dict(model)
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, r["local_packed_bytes"])
        try:  # a sharded model refuses to dequantize (or merge, export): this process holds a part of it
            from modulora_core.merge import dequantize

            dequantize(model)
            r["refused"] = None
        except Exception as e:  # noqa: BLE001 - the test checks the type and message
            r["refused"] = f"{type(e).__name__}: {e}"
        if rank == 0:
            model.save_pretrained(Path(out) / preset.replace("#", "sharp"), state_dict=sd)
            r["per_rank_packed_bytes"] = per_rank
            (Path(out) / f"{preset.replace('#', 'sharp')}.json").write_text(json.dumps(r))
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
