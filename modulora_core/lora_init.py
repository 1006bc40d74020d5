"""Quantization-aware LoRA initialization: start each adapter at the quantization error, W_q + s·B·A ≈ W.

PEFT's own initializations start at B = 0, so a 2-bit model starts training with the whole quantization
error in place; PEFT's LoftQ closes it at the start, but only for bitsandbytes layers. Here it works for every
quantizer, on PEFT's own LoRA layers:

- :func:`low_rank_residual` (pure math): the rank-r factors of the residual R = W − W_q, by SVD, or, with a
  calibration Hessian H = XᵀX, the activation-aware form minimizing ‖(R − B·A) Xᵀ‖: SVD_r(R·H^{1/2}), then
  H^{-1/2} on A's side (the weighted Eckart–Young problem of LoftQ-with-data / QERA / CLoQ).
- :class:`LoraInit`: the option passed to ``quantize_model`` (``QuantizeOptions.lora_init``); while each
  dense weight is still in hand it quantizes, computes the factors, optionally alternates LoftQ-style
  (re-quantize W − B·A, refit), and keeps the factors keyed by module name.
- :func:`apply_lora_init`: after ``get_peft_model``, writes the factors into ``lora_A``/``lora_B`` with each
  layer's own scaling. The adapter stays a stock PEFT adapter (it only starts elsewhere).
- :func:`init_lora_from_residual`: the same for a model quantized already, given its dense source.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import AdapterError
from .qlinear import QuantizedLinear

Factors = tuple[torch.Tensor, torch.Tensor]  # (B0 [out, r], A0 [r, in]), B0 @ A0 ≈ W − W_q, no LoRA scaling in


def low_rank_residual(residual: torch.Tensor, rank: int, hessian: torch.Tensor | None = None,
                      damp: float = 0.01) -> Factors:
    """``(B0 [out, r], A0 [r, in])``, the best rank-``rank`` approximation ``B0 @ A0`` of ``residual``
    ``[out, in]``: in Frobenius norm, or, with ``hessian`` ``[in, in]`` (XᵀX of the layer's inputs), in the
    output error ‖(residual − B0·A0) Xᵀ‖. ``damp`` · mean(diag H) is added to H's diagonal (as GPTQ does)
    so that inputs never seen in calibration still get a finite weight. Float32 results."""
    R = residual.detach().to(torch.float64)  # (out, in); SVD in float64: the residual is small against W
    r = min(rank, *R.shape)
    if hessian is None:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        root = S[:r].sqrt()  # split the singular values evenly, so A and B start at the same scale
        return _padded((U[:, :r] * root).float(), (root[:, None] * Vh[:r]).float(), rank)
    H = hessian.detach().to(torch.float64)  # (in, in)
    H = H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    evals, Q = torch.linalg.eigh(H)
    evals = evals.clamp_min(evals.max() * 1e-12)
    sqrt_h = (Q * evals.sqrt()) @ Q.T
    inv_sqrt_h = (Q * evals.rsqrt()) @ Q.T
    U, S, Vh = torch.linalg.svd(R @ sqrt_h, full_matrices=False)  # whitened: Frobenius norm = output error
    root = S[:r].sqrt()
    return _padded((U[:, :r] * root).float(), ((root[:, None] * Vh[:r]) @ inv_sqrt_h).float(), rank)


def _padded(B: torch.Tensor, A: torch.Tensor, rank: int) -> Factors:
    if B.shape[1] == rank:
        return B.contiguous(), A.contiguous()
    # rank above min(out, in): the residual is exact already; zero columns/rows change nothing
    return (torch.cat([B, B.new_zeros(B.shape[0], rank - B.shape[1])], 1),
            torch.cat([A, A.new_zeros(rank - A.shape[0], A.shape[1])], 0))


@dataclass
class LoraInit:
    """Quantization-aware LoRA initialization, as an option of ``quantize_model`` / ``modulora.load``.

    ``rank``: factors to keep (at least the LoRA rank; a smaller LoRA rank takes the leading ones).
    ``activation_aware``: use the calibration Hessian where the quantizer got one. ``iterations`` > 1:
    LoftQ-style alternation, quantizing W − B·A again and refitting (each costs one more quantization).
    ``factors`` fills in while quantizing: ``{module name: (B0 [out, r], A0 [r, in])}``.
    """

    rank: int = 8
    activation_aware: bool = True
    iterations: int = 1
    damp: float = 0.01
    factors: dict[str, Factors] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.rank < 1 or self.iterations < 1:
            raise ValueError(f"LoraInit needs rank >= 1 and iterations >= 1, got rank={self.rank}, "
                             f"iterations={self.iterations}")

    def quantize(self, name: str, weight: torch.Tensor, hessian: torch.Tensor | None,
                 quantize: Callable[[torch.Tensor, torch.Tensor | None], Any],
                 materialize: Callable[[Any], torch.Tensor]) -> Any:
        """Quantize ``weight`` ``[out, in]`` with ``quantize(w, hessian)``, record its residual factors under
        ``name`` and return the packed weight (with alternation: the one quantized from W − B·A)."""
        w = weight.detach().to(torch.float32)
        h = hessian if self.activation_aware else None
        packed = quantize(w, hessian)
        for i in range(self.iterations):
            B0, A0 = low_rank_residual(w - materialize(packed).to(torch.float32), self.rank, h, self.damp)
            if i + 1 < self.iterations:  # LoftQ: Q_t = q(W − L_{t-1}), L_t = SVD_r(W − Q_t)
                packed = quantize((w - B0 @ A0).contiguous(), hessian)
        self.factors[name] = (B0, A0)
        return packed

    def refit(self, name: str, weight: torch.Tensor, hessian: torch.Tensor | None, quantized: torch.Tensor) -> None:
        """Factor the residual of ``weight`` ``[out, in]`` against ``quantized`` ``[out, in]`` (the dense form
        of the packed weight after a tuning stage changed it) again, under ``name``."""
        residual = weight.detach().to(torch.float32) - quantized.to(torch.float32)
        self.factors[name] = low_rank_residual(residual, self.rank, hessian if self.activation_aware else None,
                                               self.damp)


def apply_lora_init(model: nn.Module, factors: Mapping[str, Factors], adapter_name: str = "default") -> list[str]:
    """Write ``factors`` into the LoRA layers of ``model`` (a ``PeftModel`` or the model it wraps) so that
    ``scaling · lora_B @ lora_A = B0 @ A0`` for adapter ``adapter_name``; returns the module names set.

    Modules with factors but no such adapter are left alone. DoRA magnitudes are recomputed from the new
    start (PEFT sets them from ``W_q + s·B·A`` when the adapter is created)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    done = []
    for name, (B0, A0) in factors.items():
        try:
            layer = base.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        r, s = layer.r[adapter_name], layer.scaling[adapter_name]
        if r > B0.shape[1]:
            raise AdapterError(f"{name}: LoRA rank {r} but the residual was factored at rank {B0.shape[1]}; "
                               f"quantize with LoraInit(rank={r}) (or more)")
        c = 1.0 / math.sqrt(s)  # s·(cB)(cA) = B0 A0, the scaling split evenly like the singular values
        lora_A, lora_B = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        with torch.no_grad():
            lora_A.copy_((A0[:r] * c).to(lora_A))
            lora_B.copy_((B0[:, :r] * c).to(lora_B))
        dora = getattr(layer, "lora_magnitude_vector", {})
        if adapter_name in dora:
            dora[adapter_name].update_layer(base_layer=layer.get_base_layer(), lora_A=lora_A, lora_B=lora_B,
                                            scaling=s)
        done.append(name)
    return done


def init_lora_from_residual(model: nn.Module, dense: nn.Module | Mapping[str, torch.Tensor], *,
                            hessians: Mapping[str, torch.Tensor] | None = None, adapter_name: str = "default",
                            damp: float = 0.01) -> list[str]:
    """Initialize the LoRA adapters of a quantized ``model`` (a ``PeftModel``) from the residual of each
    quantized base against ``dense``: the dense model (same module names) or ``{name: weight [out, in]}``.
    ``hessians`` ``{name: XᵀX [in, in]}`` gives the activation-aware form. No alternation: the packed weights
    are fixed already (pass ``LoraInit(iterations=...)`` to ``quantize_model`` for that). Returns the names set."""
    from peft.tuners.lora import LoraLayer

    from .layouts import linear_weight

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    factors: dict[str, Factors] = {}
    for name, layer in base.named_modules():
        if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
            continue
        q = layer.get_base_layer()
        if not isinstance(q, QuantizedLinear):
            continue
        w = dense[name] if isinstance(dense, Mapping) else linear_weight(dense.get_submodule(name))
        residual = w.detach().to(torch.float32) - q.dequantize(torch.float32)
        factors[name] = low_rank_residual(residual, layer.r[adapter_name],
                                          None if hessians is None else hessians.get(name), damp)
    return apply_lora_init(model, factors, adapter_name)
