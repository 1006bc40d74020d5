"""ModuLoRALinear: a frozen, packed base weight plus trainable LoRA A/B."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .autograd import quantized_matmul
from .errors import ModuLoRAError
from .quantizer import PackedWeight, Quantizer, dtype_from_name

PACKED_PREFIX = "packed_"


def _check_chunk_rows(chunk_rows: int | None) -> int | None:
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ModuLoRAError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


class ModuLoRALinear(nn.Module):
    """``y = x W^T + b + (alpha/r) * B(A(dropout(x)))`` with W kept only in packed form.

    The packed tensors are buffers named ``packed_<name>`` (they move with ``.to()`` and are saved in the
    state dict; they are never Parameters). ``lora_A`` ([r, in]) and ``lora_B`` ([out, r]) are the only
    trainable parameters; their names match PEFT's so adapters load in stock PEFT.
    """

    def __init__(self, packed: PackedWeight, quantizer: Quantizer, *, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, bias: torch.Tensor | None = None, chunk_rows: int | None = None,
                 quantizer_name: str | None = None, plugin_version: str | None = None,
                 lora_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r < 0 or int(r) != r:
            raise ModuLoRAError(f"LoRA rank r must be a non-negative int, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ModuLoRAError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.quantizer = quantizer
        self.quantizer_name = quantizer_name or quantizer.name
        self.plugin_version = plugin_version
        self.out_features, self.in_features = packed.shape
        self._meta = {k: v for k, v in packed.metadata().items()}
        self._packed_config = packed.config
        self._packed_keys = list(packed.tensors)
        for k, t in packed.tensors.items():
            self.register_buffer(PACKED_PREFIX + k, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.chunk_rows = _check_chunk_rows(chunk_rows)
        self.use_fast_path = quantizer.capabilities(packed.config).fast_path
        self.adapter_enabled = True
        self.r, self.alpha = int(r), float(alpha)
        self.scaling = self.alpha / self.r if self.r else 0.0
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, self.r, bias=False, dtype=lora_dtype)
        self.lora_B = nn.Linear(self.r, self.out_features, bias=False, dtype=lora_dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A: Kaiming-uniform (as nn.Linear and PEFT); B: zeros, so the adapter starts as a no-op."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def packed(self) -> PackedWeight:
        """The packed weight, over the module's current buffers (so it follows ``.to(device)``)."""
        tensors = {k: getattr(self, PACKED_PREFIX + k) for k in self._packed_keys}
        m = self._meta
        return PackedWeight(m["quantizer"], self._packed_config, tuple(m["shape"]),
                            dtype_from_name(m["dtype"]), tensors, m["format_version"], dict(m["extra"]))

    def dense_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The materialized ``[out, in]`` base weight (a new tensor; for export and tests, not training)."""
        p = self.packed
        return self.quantizer.materialize(p, dtype=dtype or p.dtype, device=p.device)

    def lora_delta(self) -> torch.Tensor:
        """``scaling * B @ A``: the ``[out, in]`` update LoRA adds to the base weight."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = quantized_matmul(x, self.quantizer, self.packed, chunk_rows=self.chunk_rows,
                             fast=self.use_fast_path)  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        if self.r and self.adapter_enabled:
            a = self.lora_A.weight
            lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(a.dtype))))
            y = y + (lora * self.scaling).to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quantizer={self.quantizer_name!r}, r={self.r}, alpha={self.alpha:g}, "
                f"chunk_rows={self.chunk_rows}, bias={self.bias is not None}")

    def quant_metadata(self) -> dict[str, Any]:
        """What a checkpoint records about this layer's packed weight."""
        return {**self._meta, "quantizer_name": self.quantizer_name, "plugin_version": self.plugin_version,
                "has_bias": self.bias is not None}
