"""FSDP2 over a ModuLoRA model: every plugin's packed storage sharded across ranks.

``shard_model`` makes each :class:`~modulora_core.qlinear.QuantizedLinear`'s packed tensors frozen
``nn.Parameter``s (FSDP2 shards parameters, never buffers) and applies ``fully_shard`` per decoder block and
at the root. Each rank then holds about 1/N of the packed bytes; a block's packed tensors are all-gathered
for its forward and again for its backward, and freed after each.

The packed tensors are flattened to 1-D before sharding: FSDP2 splits dim 0, and a plugin's tensors can have a
short dim 0 (a ``[1, n]`` codebook, a scalar scale) that would leave one rank holding everything; flat, every
tensor splits to within one element. ``QuantizedLinear.packed`` views them back in their plugin's shapes, so a
plugin never sees the difference. Mixed dtypes within one block are fine: FSDP2 all-gathers frozen tensors
of different dtypes through one byte buffer; only trainable parameters (the LoRA weights) must share one.

The backward's re-materialization keeps Python references to the packed tensors of the forward
(:mod:`modulora_core.autograd`). FSDP2 reuses the same unsharded tensor objects on every all-gather (it frees
and re-allocates their storage), and its pre-backward hook all-gathers a block before any of the block's
backward runs, so those references see the gathered bytes again (``tests/test_fsdp.py`` checks the gradients).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from .errors import ModuLoRAError, sharded_error  # noqa: F401 - sharded_error: re-exported
from .qlinear import PACKED_PREFIX, iter_quantized_layers


def packed_as_parameters(model: nn.Module) -> int:
    """Turn every QuantizedLinear's packed buffers into frozen, flat ``nn.Parameter``s; returns their count.

    Idempotent. The layer keeps working unsharded (its ``packed`` views the flat tensors back)."""
    n = 0
    for _, layer in iter_quantized_layers(model):
        if layer._packed_shapes is not None:
            continue
        shapes = {}
        # Sorted: FSDP2 packs a block's tensors into its all-gather buffer in registration order, and every
        # rank must use the same. The plugin's own key order differs between a freshly quantized layer and one
        # loaded from disk (the main process quantizes, the others load its save): unsorted, the ranks would
        # exchange each other's codes for scales.
        for k in sorted(layer._packed_keys):
            name = PACKED_PREFIX + k
            t = layer._buffers.pop(name)
            shapes[k] = tuple(t.shape)
            layer.register_parameter(name, nn.Parameter(t.detach().reshape(-1), requires_grad=False))
            n += 1
        layer._packed_shapes = shapes
    return n


def block_modules(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks to shard one by one: the modules whose class transformers names in
    ``_no_split_modules`` (what accelerate's FSDP auto-wrap uses); every QuantizedLinear if there are none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    return blocks or [m for _, m in iter_quantized_layers(model)]


def embedding_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """The FSDP units of the input embedding and the lm_head: one each, or one for both when they share
    their weight (``tie_word_embeddings``: FSDP2 must see a shared parameter in one unit only)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    emb = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
    head = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    mods = [m for m in (emb, head) if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    if len(mods) == 2 and _shares_parameters(*mods):
        return [mods]
    return list(mods)


def _shares_parameters(a: nn.Module, b: nn.Module) -> bool:
    return bool({id(p) for p in a.parameters()} & {id(p) for p in b.parameters()})


def shard_model(model: nn.Module, mesh: Any = None, *, reshard_after_forward: bool = True,
                device: str | torch.device | None = None) -> nn.Module:
    """Shard ``model`` (a quantized transformers model or a PeftModel over one) with FSDP2, in place.

    Units: each decoder block, the input embedding and the lm_head (one unit if tied), then the root (the
    final norm and anything else). ``mesh``: a 1-D ``DeviceMesh`` (default: every rank of the default process
    group, on ``device``, else the device the model is on). A model left on the CPU and sharded over a CUDA
    mesh reaches the GPU one unit at a time (FSDP2 moves a unit whole, then keeps its shard), so no GPU ever
    holds the whole model. Call it after the adapters are attached and before the
    optimizer is built; returns the model.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        dev = torch.device(device) if device is not None else next(model.parameters()).device
        mesh = init_device_mesh(dev.type, (dist.get_world_size(),))
    packed_as_parameters(model)
    blocks = block_modules(model)
    in_blocks = {id(m) for b in blocks for m in b.modules()}
    # an embedding inside a block (a model without _no_split_modules sharded per linear) is its block's
    embeddings = [u for u in embedding_units(model)
                  if not any(id(m) in in_blocks for m in (u if isinstance(u, list) else [u]))]
    for unit in [*blocks, *embeddings]:
        sources = [p.data for m in (unit if isinstance(unit, list) else [unit]) for p in m.parameters()]
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward)
        release_file_pages(sources)  # what this unit read of a mapped checkpoint, before the next unit reads
        del sources
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


_MADV_DONTNEED = 4
_PRESENT, _FILE_PAGE = 1 << 63, 1 << 61  # /proc/self/pagemap flags of a page


def release_file_pages(tensors: list[torch.Tensor]) -> int:
    """Drop this process's resident pages of those ``tensors`` that view a memory-mapped file unchanged (a
    checkpoint that ``from_pretrained`` maps); returns the bytes released.

    Why: every tensor of a loaded checkpoint views one mapping of its file, which stays mapped until the last
    view dies, so while a model is sharded unit by unit the pages already read (and copied into shards)
    would stay in the RSS until the end: one whole model per process. The pages stay in the page cache,
    and a later read faults them back from the file, so nothing changes but the RSS. A tensor with a page
    written since it was mapped (a private copy: dropping it would lose the write) is left alone, as is
    anything outside a file mapping (anonymous memory would read back as zeros). Linux only; elsewhere a
    no-op."""
    maps = _file_mappings()
    if not maps:
        return 0
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    done = 0
    with open("/proc/self/pagemap", "rb") as pagemap:
        for t in tensors:
            if t.device.type != "cpu" or t.is_meta or not t.is_contiguous():
                continue
            start = t.data_ptr()  # the tensor's own bytes: its storage may be the whole file
            end = start + t.numel() * t.element_size()
            if not any(lo <= start and end <= hi for lo, hi in maps):
                continue
            lo, hi = -(-start // page) * page, end // page * page  # whole pages inside the tensor only
            if hi <= lo:
                continue
            pagemap.seek(lo // page * 8)
            flags = torch.frombuffer(bytearray(pagemap.read((hi - lo) // page * 8)), dtype=torch.int64)
            present = (flags & _PRESENT - (1 << 64)) != 0  # bit 63 is the sign bit of an int64
            if bool((present & ((flags & _FILE_PAGE) == 0)).any()):
                continue  # a page written in place: a private copy, not the file's
            if libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED) == 0:
                done += hi - lo
    return done


def _file_mappings() -> list[tuple[int, int]]:
    """``(start, end)`` of this process's mappings of regular files (``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].startswith("/") and parts[4] != "0":
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def local_packed_bytes(model: nn.Module) -> int:
    """Bytes of packed storage this rank holds (its shards under FSDP, everything otherwise)."""
    total = 0
    for _, layer in iter_quantized_layers(model):
        for k in layer._packed_keys:
            t = getattr(layer, PACKED_PREFIX + k)
            t = t.to_local() if hasattr(t, "to_local") else t
            total += t.numel() * t.element_size()
    return total


def full_trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (the adapters), gathered whole, on the CPU. A collective: every rank calls
    it; every rank gets the dict (rank 0 saves it)."""
    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out[name] = t.detach().cpu()
    return out


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 holds some QuantizedLinear's packed tensors of ``model`` sharded (DTensors) right now."""
    return any(hasattr(getattr(layer, PACKED_PREFIX + k), "to_local")
               for _, layer in iter_quantized_layers(model) for k in layer._packed_keys)


def refuse_if_sharded(model: nn.Module, what: str = "the model") -> None:
    """Raise :func:`sharded_error` when ``model`` is sharded (before a dequantize, merge or export)."""
    if is_sharded(model):
        raise sharded_error(what)
