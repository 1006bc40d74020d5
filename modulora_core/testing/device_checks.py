"""Conformance checks for GPU readiness that run on a CPU: device discipline, host syncs, low precision.

A mixin of :class:`~modulora_core.testing.QuantizerConformance` (it uses that class's fixtures and knobs).
The device checks run the plugin inside :class:`~modulora_core.testing.device_guard.DeviceGuard`, which turns
the habits that break on a GPU (tensors made on the default device, copies to the host, host syncs in
forward/backward) into failures here. The low-precision checks compare float16/bfloat16 against float64 with
tolerances that follow from each dtype's rounding; their shapes are small because bfloat16 is slow on CPUs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

from ..quantizer import Capabilities, dtype_from_name
from ..registry import Preset
from .autograd_checks import CHUNKED, quantized_lora, rel_err
from .device_guard import DeviceGuard
from .support import require, who
from .weights import fit_shape, gaussian_weight, synthetic_hessian

LOW = pytest.mark.parametrize("low", ["float16", "bfloat16"])


class DeviceChecks:
    """Device discipline, no host sync in forward/backward, float16/bfloat16 against float64."""

    device_shape: ClassVar[tuple[int, int]] = (16, 128)  # (out, in), rounded up to the preset's multiples
    # relative Frobenius error of y and grad x in a low-precision layer against float64: the weight, x and
    # every output are rounded once to the dtype (unit roundoff 2^-11 / 2^-8), sums accumulate in float32
    low_precision_grad_rtol: ClassVar[dict[str, float]] = {"float16": 4e-3, "bfloat16": 3e-2}
    # materialize in float16/bfloat16 must be the float64 weight rounded once: |w - w64| <= ulp_rtol * eps * |w64|
    # (plus the dtype's smallest normal, for weights that underflow); 1.0 allows one ulp, not double rounding
    materialize_ulp_rtol: ClassVar[float] = 1.0

    seed: ClassVar[int]
    lora_rank: ClassVar[int]
    chunk_rows: ClassVar[int]
    ref_dtype: Any
    fast_path_rtol: ClassVar[float]

    def _case(self, bq: Preset, caps: Capabilities) -> tuple[torch.Tensor, torch.Tensor | None]:
        shape = fit_shape(self.device_shape, caps.out_multiple, caps.in_multiple)
        seed = self.seed * 1000 + 300
        h = synthetic_hessian(shape[1], seed) if caps.needs_calibration else None
        return gaussian_weight(shape, seed, 0.02), h

    def test_quantize_and_materialize_stay_on_device(self, bound_preset, capabilities) -> None:
        bq, q = bound_preset, bound_preset.quantizer
        w, h = self._case(bq, capabilities)
        torch.manual_seed(self.seed)
        with DeviceGuard(f"{who(bq, 'quantize/pack')}"):
            packed = q.quantize_weight(w, bq.config, h)
        for k, t in packed.tensors.items():
            require(t.device == w.device, f"{who(bq, 'pack')} put {k!r} on {t.device}; the weight is on {w.device}")
        dt = self.ref_dtype(capabilities)
        q.materialize(packed, dtype=dt)  # a first call may decide things once (per-device caches)
        with DeviceGuard(f"{who(bq, 'materialize')}", forbid_sync=True):
            dense = q.materialize(packed, dtype=dt)
            q.materialize(packed, dtype=dt, rows=slice(0, 8))
        require(dense.device == w.device, f"{who(bq, 'materialize')} without device= returned a tensor on "
                f"{dense.device}; expected the packed weight's device {w.device}")

    @CHUNKED
    def test_forward_backward_without_host_sync(self, bound_preset, capabilities, chunked) -> None:
        bq = bound_preset
        w, h = self._case(bq, capabilities)
        torch.manual_seed(self.seed)
        packed = bq.quantizer.quantize_weight(w, bq.config, h)
        dt = self.ref_dtype(capabilities)
        layer = quantized_lora(packed, bq.quantizer, self.lora_rank, dt,
                               chunk_rows=self.chunk_rows if chunked else None)
        x = torch.randn(2, 3, w.shape[1], dtype=dt, requires_grad=True)
        gy = torch.randn(2, 3, w.shape[0], dtype=dt)
        layer(x)  # a first call may fill per-device caches; the steady state must not sync
        with DeviceGuard(f"{who(bq, 'forward/backward')} through PEFT's LoRA over QuantizedLinear",
                         forbid_sync=True):
            y = layer(x)
            y.backward(gy)
        require(x.grad is not None, f"{who(bq, 'backward')} gave no gradient for x")

    def test_matmul_small_matches_materialize(self, bound_preset, capabilities) -> None:
        bq, q = bound_preset, bound_preset.quantizer
        w, h = self._case(bq, capabilities)
        torch.manual_seed(self.seed)
        packed = q.quantize_weight(w, bq.config, h)
        dt = self.ref_dtype(capabilities)
        dense = q.materialize(packed, dtype=dt)  # (out, in)
        g = torch.Generator().manual_seed(self.seed + 29)
        for rows in (1, 3):
            x = torch.randn(rows, w.shape[1], generator=g).to(dt)
            if q.matmul_small(x, packed) is None:  # the warm-up call, too (per-device caches)
                pytest.skip(f"{who(bq, 'matmul_small')} declines this weight: decode steps materialize")
            with DeviceGuard(f"{who(bq, 'matmul_small')}", forbid_sync=True):
                y = q.matmul_small(x, packed)
            require(y.shape == (rows, w.shape[0]) and y.dtype == dt,
                    f"{who(bq, 'matmul_small')} returned {tuple(y.shape)} {y.dtype}; expected {(rows, w.shape[0])} {dt}")
            err = rel_err(y, x @ dense.T)
            require(err <= self.fast_path_rtol, f"{who(bq, 'matmul_small')} differs from x @ materialize().T by "
                    f"relative {err:.3g} > fast_path_rtol={self.fast_path_rtol:g} for {rows} row(s)")

    @LOW
    def test_low_precision_materialize_is_rounded_once(self, bound_preset, capabilities, low) -> None:
        if low not in capabilities.dtypes:
            pytest.skip(f"Capabilities.dtypes has no {low}")
        bq, q = bound_preset, bound_preset.quantizer
        w, h = self._case(bq, capabilities)
        torch.manual_seed(self.seed)
        packed = q.quantize_weight(w, bq.config, h)
        exact = "float64" if "float64" in capabilities.dtypes else "float32"
        ref = q.materialize(packed, dtype=dtype_from_name(exact)).to(torch.float64)
        dt = dtype_from_name(low)
        got = q.materialize(packed, dtype=dt).to(torch.float64)
        fi = torch.finfo(dt)
        excess = (got - ref).abs() - (self.materialize_ulp_rtol * fi.eps * ref.abs() + fi.tiny)
        require(float(excess.max()) <= 0, f"{who(bq, 'materialize')}(dtype={low}) is off the {exact} weight by up to "
                f"{float((got - ref).abs().max()):.3g}, more than one {low} rounding (materialize_ulp_rtol="
                f"{self.materialize_ulp_rtol}): compute in float32 and cast once")

    @LOW
    @pytest.mark.parametrize("lora_dtype", ["float32", "compute"])
    def test_low_precision_autograd_matches_float64(self, bound_preset, capabilities, low, lora_dtype) -> None:
        if low not in capabilities.dtypes:
            pytest.skip(f"Capabilities.dtypes has no {low}")
        bq, caps = bound_preset, capabilities
        w, h = self._case(bq, caps)
        torch.manual_seed(self.seed)
        packed = bq.quantizer.quantize_weight(w, bq.config, h)
        dt = dtype_from_name(low)
        ldt = torch.float32 if lora_dtype == "float32" else dt
        layer = quantized_lora(packed, bq.quantizer, self.lora_rank, ldt, chunk_rows=self.chunk_rows)
        g = torch.Generator().manual_seed(self.seed + 23)
        with torch.no_grad():  # B = 0 at init would hide the adapter's share of the output
            for ab in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                ab.copy_(torch.randn(ab.shape, generator=g) * 0.3)
        x = torch.randn(2, 3, w.shape[1], generator=g).to(dt).requires_grad_()
        y = layer(x)
        require(y.dtype == dt, f"{who(bq, 'matmul')}: a {low} input gave a {y.dtype} output")
        gy = torch.randn(y.shape, generator=g).to(dt)
        (gx,) = torch.autograd.grad(y, (x,), gy)

        exact = torch.float64 if "float64" in caps.dtypes else torch.float32
        w64 = bq.quantizer.materialize(packed, dtype=exact).to(torch.float64)
        a, b = (p.detach().to(torch.float64) for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight))
        x64 = x.detach().to(torch.float64)
        y_ref = x64 @ w64.T + layer.scaling["default"] * (x64 @ a.T) @ b.T
        gx_ref = gy.to(torch.float64) @ (w64 + layer.scaling["default"] * b @ a)
        tol = self.low_precision_grad_rtol[low]
        for name, got, ref in (("y", y, y_ref), ("grad x", gx, gx_ref)):
            err = rel_err(got, ref)
            require(err <= tol, f"{who(bq, 'forward/backward')} in {low} (LoRA in {ldt}): {name} differs from float64 by "
                    f"relative {err:.3g} > low_precision_grad_rtol[{low!r}]={tol:g}")
