"""Which modules hold a linear's weight, in which layout, and how a dense export gets the layout back.

A quantizable module is an ``nn.Linear`` (or a subclass that only changes how it multiplies, such as
Falcon's ``FalconLinear``), GPT-2's ``Conv1D`` (``y = x W + b`` with W stored ``[in, out]``), or one
expert's matrix once :mod:`modulora_core.experts` has unfused a mixture-of-experts layer. Every one is
quantized as the ``[out, in]`` weight of ``y = x W^T + b``; a :class:`QuantizedLinear` remembers a
Conv1D source in ``source_layout`` so that :func:`restore_layouts` can write a dense model that stock
transformers reads (Conv1D weights transposed back, experts fused back into 3-D parameters).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from .experts import fuse_experts

# routers stay unquantized: a few small matrices whose rounding errors reroute tokens
ROUTER_LEAVES = frozenset({"gate", "router", "shared_expert_gate", "gating"})
CONV1D = "conv1d"


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D``: a linear whose weight is stored ``[in, out]``."""
    cls = _conv1d_class()
    return cls is not None and isinstance(m, cls)


def is_quantizable(m: nn.Module) -> bool:
    """A module this engine can pack: a dense float ``nn.Linear`` (or plain subclass) or a ``Conv1D``.

    Not a QuantizedLinear, not an adapter layer, not another library's quantized linear (whose weight is
    not a floating-point ``[out, in]`` parameter)."""
    from .qlinear import QuantizedLinear

    if isinstance(m, QuantizedLinear) or hasattr(m, "base_layer") or hasattr(m, "lora_A"):
        return False
    if is_conv1d(m):
        return isinstance(m.weight, nn.Parameter) and m.weight.is_floating_point()
    if not isinstance(m, nn.Linear):
        return False
    w = m._parameters.get("weight")
    return (type(w) is nn.Parameter and w.is_floating_point() and w.dim() == 2
            and tuple(w.shape) == (m.out_features, m.in_features))


def linear_weight(m: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of a quantizable module (a view for Conv1D), detached."""
    w = m.weight.detach()
    return w.t() if is_conv1d(m) else w


def out_in(m: nn.Module) -> tuple[int, int]:
    """``(out_features, in_features)`` of a quantizable module."""
    if is_conv1d(m):
        return int(m.weight.shape[1]), int(m.weight.shape[0])
    return int(m.out_features), int(m.in_features)


def matches_target(name: str, target_modules: list[str] | str) -> bool:
    """PEFT semantics: a list matches by name or ``.``-suffix, a string is a regex for ``re.fullmatch``."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def is_router(name: str) -> bool:
    """Whether module ``name`` is a MoE router or gate by its leaf name (kept dense by default)."""
    return name.rsplit(".", 1)[-1] in ROUTER_LEAVES


def to_conv1d(linear: nn.Linear) -> nn.Module:
    """A ``Conv1D`` computing what ``linear`` computes (its weight transposed to ``[in, out]``)."""
    cls = _conv1d_class()
    conv = cls(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
    if linear.bias is not None:
        conv.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    else:  # Conv1D always has a bias; zeros keep the function
        conv.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype), requires_grad=False)
    return conv


def restore_layouts(model: nn.Module) -> nn.Module:
    """After every layer of ``model`` is dense again: dense linears that stood for a Conv1D become Conv1D,
    and unfused experts are fused back. Returns ``model``."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear) and getattr(m, "source_layout", None) == CONV1D:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, to_conv1d(m))
    fuse_experts(model)
    return model
