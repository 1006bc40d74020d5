"""QuantizedLinear: a frozen ``nn.Linear`` whose weight lives only in a plugin's packed form.

It has no adapter of its own: LoRA, DoRA, rsLoRA and friends come from PEFT, which wraps it like any
``nn.Linear`` (see :mod:`modulora_core.peft_lora`). Being an ``nn.Linear`` subclass is what lets PEFT's
``target_modules="all-linear"``, transformers' module walks and user code treat it as the linear it stands
for; the packed tensors are buffers named ``packed_<name>`` so they move with ``.to()`` and sit in the
state dict, and the forward goes through the re-materializing autograd of :mod:`modulora_core.autograd`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .autograd import quantized_matmul
from .errors import ModuLoRAError, sharded_error
from .quantizer import PackedWeight, Quantizer, dtype_from_name

PACKED_PREFIX = "packed_"


def check_chunk_rows(chunk_rows: int | None) -> int | None:
    """``chunk_rows`` unchanged if it is None or a positive int; a clear error otherwise."""
    if chunk_rows is not None and (isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int)
                                   or chunk_rows < 1):
        raise ModuLoRAError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    return chunk_rows


class QuantizedLinear(nn.Linear):
    """``y = x W^T + b`` with the ``[out, in]`` W kept packed; frozen, and nothing dense outlives a call.

    ``weight`` is a read-only property that materializes the dense weight on every read (PEFT's DoRA
    reads it for the column norms): use :meth:`dequantize` when you mean it, and never keep it around.
    ``preset`` is the preset the layer was quantized with (``"rtn-4bit"``), ``quantizer`` the plugin's
    object that reads the packed form.
    """

    def __init__(self, packed: PackedWeight, quantizer: Quantizer, *, bias: torch.Tensor | None = None,
                 chunk_rows: int | None = None, preset: str | None = None,
                 plugin_version: str | None = None, source_layout: str = "linear") -> None:
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate a dense weight
        self.quantizer = quantizer
        self.preset = preset or quantizer.name
        self.plugin_version = plugin_version
        self.out_features, self.in_features = (int(s) for s in packed.shape)
        self._meta = dict(packed.metadata())
        self._packed_config = packed.config
        self._packed_keys = list(packed.tensors)
        self._packed_shapes: dict[str, tuple[int, ...]] | None = None  # set when FSDP flattens them
        for k, t in packed.tensors.items():
            self.register_buffer(PACKED_PREFIX + k, t)
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.chunk_rows = check_chunk_rows(chunk_rows)
        self.use_fast_path = quantizer.capabilities(packed.config).fast_path
        # "conv1d": it replaced a GPT-2 Conv1D; a dense export transposes the weight back
        self.source_layout = source_layout

    # -- the packed weight ---------------------------------------------------------------------------
    @property
    def packed(self) -> PackedWeight:
        """The packed weight over the module's current buffers (so it follows ``.to(device)``)."""
        tensors = {k: getattr(self, PACKED_PREFIX + k) for k in self._packed_keys}
        if self._packed_shapes is not None:  # flat for FSDP (modulora_core.fsdp): view in the plugin's shapes
            if any(hasattr(t, "to_local") for t in tensors.values()):  # a DTensor: FSDP2 holds only a shard
                raise sharded_error("this layer's packed weight")
            tensors = {k: t.view(self._packed_shapes[k]) for k, t in tensors.items()}
        m = self._meta
        return PackedWeight(m["family"], self._packed_config, tuple(m["shape"]),
                            dtype_from_name(m["dtype"]), tensors, m["format_version"], dict(m["extra"]))

    @property
    def family(self) -> str:
        """The quantizer family (``"rtn"``, ``"quipsharp"``, ...)."""
        return self._meta["family"]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the dense weight this layer stands for (the model's dtype when it was quantized)."""
        return dtype_from_name(self._meta["dtype"])

    @property
    def device(self) -> torch.device:
        return self.W_q.device  # a buffer, or a parameter once FSDP shards it

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 - the name is PEFT's
        """The first packed buffer. PEFT recognizes a quantized base by ``W_q`` + ``dequantize()`` (HQQ's
        names): it then reads the device off ``W_q`` and gets DoRA's dense weight from ``dequantize()``,
        instead of materializing ``weight`` for every attribute lookup."""
        return getattr(self, PACKED_PREFIX + self._packed_keys[0])

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        """The dense ``[out, in]`` weight, materialized anew on each read (a no-grad tensor)."""
        return self.dequantize()

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The materialized ``[out, in]`` base weight, a new tensor (export, merging, DoRA norms)."""
        p = self.packed
        with torch.no_grad():
            return self.quantizer.materialize(p, dtype=dtype or p.dtype, device=p.device)

    def to_dense(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain ``nn.Linear`` holding the materialized weight (and a copy of the bias)."""
        w = self.dequantize(dtype)
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta", dtype=w.dtype)
        dense.weight = nn.Parameter(w, requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().clone().to(w.dtype), requires_grad=False)
        if self.source_layout != "linear":
            dense.source_layout = self.source_layout  # modulora_core.layouts.restore_layouts reads it
        return dense

    def quant_metadata(self) -> dict[str, Any]:
        """What a checkpoint records about this layer's packed weight."""
        return {**self._meta, "preset": self.preset, "plugin_version": self.plugin_version,
                "has_bias": self.bias is not None, "source_layout": self.source_layout}

    # -- compute ----------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in)
        y = quantized_matmul(x, self.quantizer, self.packed, chunk_rows=self.chunk_rows,
                             fast=self.use_fast_path)  # (..., out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, preset={self.preset!r}, "
                f"chunk_rows={self.chunk_rows}, bias={self.bias is not None}")


def iter_quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantizedLinear]]:
    """``(module name, layer)`` for every QuantizedLinear in ``model``, in module order."""
    for name, m in model.named_modules():
        if isinstance(m, QuantizedLinear):
            yield name, m
