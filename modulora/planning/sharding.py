"""The per-process memory of several processes: DDP (every process holds everything) or FSDP2 as
:func:`modulora_core.fsdp.shard_model` applies it (``fully_shard`` per decoder block, then at the root).

Under FSDP2 each process holds, besides what one process of a DDP run holds per batch:

- 1/N of the packed base and of each block's other parameters (norms), and 1/N of the LoRA parameters,
  gradients and optimizer states;
- what is all-gathered at once: two blocks' packed tensors (the one that runs and the one FSDP2 prefetches:
  the next in forward, the previous in backward), or, at the loss, the lm_head (its own unit, gathered for
  its forward and again for its backward) and the last block, prefetched; the input embedding is its own
  unit too, gathered only for its forward (one unit with the lm_head when they are tied);
- the root's own parameters (the final norm: what no other unit holds) whole from the start of the forward
  to the end of the backward (FSDP2 never reshards the root after forward) beside their 1/N shard;
- the process group's own runtime (gloo's or NCCL's buffers and threads): :data:`DISTRIBUTED_RUNTIME`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable

from .shapes import ModelShapes

# The process group's memory per process, on top of one process's runtime allowance: calibrated on this
# project's 2-core CPU runner with gloo (python -m benchmarks.bench_fsdp --calibrate: the peak RSS of a tiny
# model's 2-process step minus its predicted tensors: 9.1 MiB). "cuda" (NCCL) is assumed, not measured.
DISTRIBUTED_RUNTIME = {"cpu": 9 * (1 << 20), "cuda": 256 * (1 << 20)}
_BLOCK = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The decoder block a parameter or linear belongs to (``model.layers.3.mlp...`` -> 3), or None."""
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def block_packed_bytes(shapes: ModelShapes, packed_nbytes: Callable[[str, int, int], int]) -> int:
    """The packed bytes of the largest decoder block (``packed_nbytes(name, out, in)`` per quantized linear)."""
    per: dict[int | None, int] = defaultdict(int)
    for t in shapes.targets:
        per[block_of(t.name)] += packed_nbytes(t.name, t.out_features, t.in_features)
    return max((b for k, b in per.items() if k is not None), default=per.get(None, 0))


def root_dense_params(shapes: ModelShapes) -> int:
    """Parameters of the unquantized parts outside every decoder block (embeddings, final norm, lm_head)."""
    return sum(n for name, n in shapes.dense_params.items() if block_of(name) is None)


def embedding_unit_params(shapes: ModelShapes) -> list[int]:
    """Parameters of each embedding unit (``modulora_core.fsdp.embedding_units``): the root's vocabulary-sized
    matrices, the input embedding and the lm_head (one entry when tied: ``dense_params`` counts it once)."""
    return [n for name, n in shapes.dense_params.items()
            if block_of(name) is None and n >= shapes.vocab_size and n % shapes.vocab_size == 0]


def per_process(comps: list, shapes: ModelShapes, *, world_size: int, fsdp: bool, block_packed: int,
                dense_bytes_per_param: int, device: str) -> list:
    """``comps`` (one process's :class:`~modulora.planning.planner.Component` list, its batch being the
    per-process batch) as one of ``world_size`` processes holds them: unchanged under DDP but for the
    process group's runtime; under FSDP2 sharded as the module docstring says."""
    from dataclasses import replace

    from .components import Component, format_size

    n = world_size
    by = {c.key: c for c in comps}
    out = []
    for c in comps:
        if fsdp and c.key == "packed":
            head = max(embedding_unit_params(shapes), default=0) * dense_bytes_per_param
            gathered = max(2 * block_packed, block_packed + head)
            out.append(replace(c, nbytes=-(-c.nbytes // n), label=c.label + f" (1/{n} per process)"))
            out.append(Component("gathered", "all-gathered units (FSDP)", gathered,
                                 f"the larger of 2 blocks of {format_size(block_packed)} (the running one and the "
                                 f"prefetched one) and the lm_head's {format_size(head)} with one block"))
        elif fsdp and c.key == "unquantized":
            root = (root_dense_params(shapes) - sum(embedding_unit_params(shapes))) * dense_bytes_per_param
            out.append(replace(c, nbytes=root + -(-c.nbytes // n),
                               detail=c.detail + f"; FSDP: 1/{n} each, and the root's {format_size(root)} "
                               f"(final norm) gathered whole for the step"))
        elif fsdp and c.key == "lora":
            out.append(replace(c, nbytes=-(-c.nbytes // n), label=c.label + f" (1/{n} per process)"))
        elif c.key == "runtime":
            extra = DISTRIBUTED_RUNTIME.get(device, DISTRIBUTED_RUNTIME["cuda"])
            out.append(replace(c, nbytes=c.nbytes + extra, detail=c.detail + f"; + {format_size(extra)} for the "
                               f"process group ({'calibrated' if device == 'cpu' else 'assumed'})"))
        else:
            out.append(c)
    assert set(by) <= {c.key for c in out}
    return out
