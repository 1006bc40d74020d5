"""Shared pieces of the conformance kit: the test-weight record, quantizer resolution, messages."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from ..quantizer import PackedWeight, QuantizerConfig
from ..registry import Preset, get_preset


@dataclass(repr=False)
class WeightCase:
    """One test weight: its kind (``"gaussian"`` / ``"student_t"``), dense weight and packed form."""

    kind: str
    shape: tuple[int, int]
    seed: int
    weight: torch.Tensor  # (out, in) float32
    hessian: torch.Tensor | None  # (in, in), only for quantizers that need calibration
    packed: PackedWeight

    def __str__(self) -> str:
        return f"{self.kind} {self.shape[0]}x{self.shape[1]} weight (seed {self.seed})"

    __repr__ = __str__  # pytest prints fixture values in tracebacks: not whole tensors


def resolve_preset(spec: str | QuantizerConfig | Preset | None, owner: str) -> Preset:
    """The :class:`Preset` a conformance class names in its ``preset`` attribute."""
    if isinstance(spec, Preset):
        return spec
    if spec is None or spec == "":
        pytest.fail(f"{owner}.preset is not set: name an installed preset (e.g. preset = \"rtn-4bit\"), "
                    "or give a QuantizerConfig or a Preset (modulora_core.testing.preset_suite reads "
                    "it from $MODULORA_CONFORMANCE_PRESET; `modulora plugins check NAME` sets it)",
                    pytrace=False)
    return get_preset(spec)


def who(bq: Preset, method: str) -> str:
    """``"'rtn-4bit': RTNQuantizer.materialize"``: the preset and the method a message is about."""
    return f"{bq.name!r}: {type(bq.quantizer).__name__}.{method}"


def require(cond: bool, msg: str) -> None:
    """An assertion that survives ``python -O`` and always carries its message."""
    __tracebackhide__ = True  # pytest shows the failing check, not this helper
    if not cond:
        raise AssertionError(msg)


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max()) if a.numel() else 0.0


