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


def shard_model(model: nn.Module, mesh: Any = None, *, reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` (a quantized transformers model or a PeftModel over one) with FSDP2, in place.

    ``mesh``: a 1-D ``DeviceMesh`` (default: every rank of the default process group, on the device the model
    is on). Call it after the adapters are attached and before the optimizer is built; returns the model.
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        dev = next(model.parameters()).device.type
        mesh = init_device_mesh(dev, (dist.get_world_size(),))
    packed_as_parameters(model)
    for block in block_modules(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


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
