"""Mixture-of-experts experts as one linear per expert, so that every plugin quantizes them.

transformers 5 stores a MoE layer's experts fused, as 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``; ``[E, in, out]`` when the class says ``is_transposed``), and multiplies them with
one of its "experts implementations". :func:`unfuse_experts` gives each expert its own ``nn.Linear``
children, named as the fused parameters were (``mlp.experts.3.gate_up_proj``), over views of the fused
storage, and swaps the module's class for a subclass whose forward runs the routed tokens through them.
From there an expert is one more linear: the plugin packs it as a :class:`QuantizedLinear`, calibration
gives it the Hessian of the tokens routed to it, PEFT wraps it in its own LoRA layer (LoRA per expert,
``target_modules=["gate_up_proj", "down_proj"]`` or ``"all-linear"``), and the re-materializing autograd
makes one expert dense at a time, in forward and in backward. :func:`fuse_experts` puts dense experts back
in the fused layout, for a dense export that stock transformers loads.
"""

from __future__ import annotations

import re

import torch
from torch import nn

_UNFUSED: dict[type, type] = {}


def is_fused_experts(m: nn.Module) -> bool:
    """Whether ``m`` is a transformers experts module holding its experts as 3-D parameters."""
    down = getattr(m, "down_proj", None)
    return (hasattr(m, "has_gate") and hasattr(m, "is_transposed") and isinstance(down, nn.Parameter)
            and down.dim() == 3)


def is_unfused_experts(m: nn.Module) -> bool:
    """Whether ``m`` went through :func:`unfuse_experts`."""
    return getattr(type(m), "_modulora_unfused", False)


def projections(m: nn.Module) -> tuple[str, str]:
    """The names of an experts module's two matrices: ``("gate_up_proj", "down_proj")`` or
    ``("up_proj", "down_proj")`` for experts without a gate."""
    return ("gate_up_proj" if m.has_gate else "up_proj"), "down_proj"


def _unfused_forward(self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                     top_k_weights: torch.Tensor) -> torch.Tensor:
    """``[T, H]`` tokens, ``[T, K]`` expert ids and routing weights -> ``[T, H]``, one expert at a time."""
    first, down = projections(self)
    n_experts = self._modulora_num_experts
    # accumulate in fp32: index_add_ in bf16/fp16 loses the small contributions of low-weight experts
    acc_dtype = torch.float32 if hidden_states.dtype in (torch.float16, torch.bfloat16) else hidden_states.dtype
    out = torch.zeros(hidden_states.shape, dtype=acc_dtype, device=hidden_states.device)
    with torch.no_grad():
        hit = torch.unique(top_k_index).tolist()
    for e in hit:
        if not 0 <= e < n_experts:  # expert-parallel sentinels
            continue
        tok, pos = torch.where(top_k_index == e)  # (n_e,), (n_e,)
        expert = self._modules[str(e)]
        h = getattr(expert, first)(hidden_states[tok])  # (n_e, 2I) or (n_e, I)
        h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
        y = getattr(expert, down)(h)  # (n_e, H)
        if getattr(self, "has_post_expert_norm", False):
            y = self.post_expert_norm(y)
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(acc_dtype))
    return out.to(hidden_states.dtype)


def _unfused_class(cls: type) -> type:
    if cls not in _UNFUSED:
        sub = type(f"Unfused{cls.__name__}", (cls,), {
            "forward": _unfused_forward, "_modulora_unfused": True, "_modulora_fused_class": cls,
            "__module__": __name__, "__doc__": f"{cls.__name__} with one linear per expert (ModuLoRA)."})
        globals()[sub.__name__] = sub  # so pickle finds the class by name
        _UNFUSED[cls] = sub
    return _UNFUSED[cls]


def _linear_over(w: torch.Tensor, b: torch.Tensor | None, requires_grad: bool) -> nn.Linear:
    """An ``nn.Linear`` whose weight is ``w`` ``[out, in]`` itself (a view: no copy)."""
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w, requires_grad=requires_grad)
    if b is not None:
        lin.bias = nn.Parameter(b, requires_grad=requires_grad)
    return lin


def unfuse_module(m: nn.Module) -> None:
    """Replace the fused 3-D parameters of experts module ``m`` by children ``"0" .. "E-1"``, each with
    one ``nn.Linear`` per matrix over a view of the fused storage. In place; works on the meta device."""
    fused: dict[str, tuple[torch.Tensor, torch.Tensor | None, bool]] = {}
    for p in projections(m):
        w = getattr(m, p)
        b = getattr(m, p + "_bias", None) if m.has_bias else None
        fused[p] = (w.detach(), None if b is None else b.detach(), w.requires_grad)
        delattr(m, p)
        if b is not None:
            delattr(m, p + "_bias")
    n_experts = next(iter(fused.values()))[0].shape[0]
    for e in range(n_experts):
        expert = nn.Module()
        for p, (w, b, rg) in fused.items():
            we = w[e].t() if m.is_transposed else w[e]  # (out, in)
            expert.add_module(p, _linear_over(we, None if b is None else b[e], rg))
        m.add_module(str(e), expert)
    m._modulora_num_experts = n_experts
    # transformers' weight init would look for the fused parameters; the children are initialized on their own
    m._is_hf_initialized = True
    m.__class__ = _unfused_class(type(m))


def unfuse_experts(model: nn.Module) -> list[str]:
    """Unfuse every fused experts module of ``model`` (:func:`unfuse_module`); returns their names."""
    names = [n for n, m in model.named_modules() if is_fused_experts(m)]
    for n in names:
        unfuse_module(model.get_submodule(n))
    return names


def fuse_module(m: nn.Module) -> None:
    """Inverse of :func:`unfuse_module` for dense experts: stack the per-expert weights back into the fused
    3-D parameters (new tensors) and restore the original class. Every expert must hold plain tensors."""
    n_experts = m._modulora_num_experts
    for p in projections(m):
        lins = [getattr(m._modules[str(e)], p) for e in range(n_experts)]
        ws = [lin.weight.detach() for lin in lins]  # (out, in) each
        w = torch.stack([x.t() for x in ws] if m.is_transposed else ws)
        setattr(m, p, nn.Parameter(w.contiguous(), requires_grad=False))
        if m.has_bias:
            setattr(m, p + "_bias", nn.Parameter(torch.stack([lin.bias.detach() for lin in lins]),
                                                 requires_grad=False))
    for e in range(n_experts):
        del m._modules[str(e)]
    m.__class__ = type(m)._modulora_fused_class
    del m._modulora_num_experts, m._is_hf_initialized


def fuse_experts(model: nn.Module) -> list[str]:
    """Fuse back every unfused experts module of ``model`` (after dequantizing); returns their names."""
    names = [n for n, m in model.named_modules() if is_unfused_experts(m)]
    for n in names:
        fuse_module(model.get_submodule(n))
    return names


def expert_groups(model: nn.Module, names: list[str]) -> dict[str, str]:
    """``{module name: group}`` for the names in ``names`` that are one expert's matrix; the group is the
    name with the expert index replaced by ``*`` (``mlp.experts.*.down_proj``): the same matrix of every
    expert of one layer, which calibration quantizes as one stage."""
    prefixes = [n for n, m in model.named_modules() if is_unfused_experts(m)]
    if not prefixes:
        return {}
    pat = re.compile("^(" + "|".join(re.escape(p) for p in prefixes) + r")\.(\d+)\.(.+)$")
    out = {}
    for n in names:
        if (mt := pat.match(n)) is not None:
            out[n] = f"{mt.group(1)}.*.{mt.group(3)}"
    return out


def has_unfused_experts(model: nn.Module) -> bool:
    """Whether any experts module of ``model`` went through :func:`unfuse_experts`."""
    return any(is_unfused_experts(m) for m in model.modules())


def expert_parameter_modules(model: nn.Module, target: str) -> list[str]:
    """The per-expert modules standing for PEFT ``target_parameters`` entry ``target`` (a fused parameter
    name or ``.``-suffix, ``"mlp.experts.down_proj"``): ``[..., "mlp.experts.<e>.down_proj", ...]``."""
    return [f"{n}.{e}.{p}" for n, m in model.named_modules() if is_unfused_experts(m) for p in projections(m)
            if f"{n}.{p}" == target or f"{n}.{p}".endswith("." + target)
            for e in range(m._modulora_num_experts)]
