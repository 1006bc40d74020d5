"""Conformance checks of PEFT's LoRA/DoRA over a quantizer's QuantizedLinear: gradients, memory, fast path.

A mixin of :class:`~modulora_core.testing.QuantizerConformance`; it uses that class's fixtures
(``bound_preset``, ``capabilities``, ``weight_cases``) and knobs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ..qlinear import QuantizedLinear
from ..quantizer import Capabilities, PackedWeight, Quantizer
from ..registry import Preset
from .support import WeightCase, require, who
from .weights import fit_shape, gaussian_weight, synthetic_hessian

CHUNKED = pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``||a - ref||_F / ||ref||_F`` in float64 (absolute when ``ref`` is zero)."""
    d = (a.detach().to(torch.float64) - ref.detach().to(torch.float64)).norm()
    return float(d / ref.detach().to(torch.float64).norm().clamp_min(1e-30))


def lora_over(base: nn.Linear, r: int, dtype: torch.dtype, *, use_dora: bool = False) -> nn.Module:
    """PEFT's LoRA layer (adapter ``"default"``, alpha = 2r, A and B random) over ``base``, as
    ``get_peft_model`` would build it; LoRA weights in ``dtype``."""
    from peft import LoraConfig, inject_adapter_in_model

    holder = nn.ModuleDict({"proj": base})
    # PEFT reads the device off the model's first parameter; a packed layer without bias has none
    holder.register_parameter("anchor", nn.Parameter(torch.zeros(1, dtype=dtype), requires_grad=False))
    cfg = LoraConfig(r=r, lora_alpha=2.0 * r, target_modules=["proj"], init_lora_weights=False,
                     use_dora=use_dora)
    inject_adapter_in_model(cfg, holder)
    layer = holder["proj"]
    for n, p in layer.named_parameters():
        if "lora_" in n:
            p.data = p.data.to(dtype)
    return layer


def quantized_lora(packed: PackedWeight, quantizer: Quantizer, r: int, dtype: torch.dtype, *,
                   chunk_rows: int | None = None, use_dora: bool = False) -> nn.Module:
    """:func:`lora_over` a QuantizedLinear over ``packed``."""
    return lora_over(QuantizedLinear(packed, quantizer, chunk_rows=chunk_rows), r, dtype, use_dora=use_dora)


class AutogradChecks:
    """PEFT's LoRA over a QuantizedLinear of the quantizer: forward/backward against dense float64."""

    gradcheck_shape: ClassVar[tuple[int, int]] = (12, 16)  # (out, in), rounded up to the preset's multiples
    gradcheck_batch: ClassVar[tuple[int, ...]] = (2, 2)  # leading dims of x: a 3-D input exercises reshapes
    gradcheck_fast_mode: ClassVar[bool] = True  # random projections of the Jacobian: a few forwards, not one per input
    lora_rank: ClassVar[int] = 4
    chunk_rows: ClassVar[int] = 5  # rows per tile in the chunked variants (ragged against most shapes)
    grad_rtol: ClassVar[float] = 1e-4  # relative Frobenius tolerance when the layer runs in float32
    grad_rtol_float64: ClassVar[float] = 1e-9  # ... when it runs in float64
    dora_rtol_float64: ClassVar[float] = 1e-7  # DoRA divides by column norms: a little more float64 rounding
    fast_path_rtol: ClassVar[float] = 1e-5  # matmul/matmul_T against the materialized weight

    # supplied by QuantizerConformance
    seed: ClassVar[int]
    ref_dtype: Any
    dense: Any

    def compute_dtype(self, caps: Capabilities) -> torch.dtype:
        """float64 when the preset can materialize it (exact reference), else the reference dtype."""
        return torch.float64 if "float64" in caps.dtypes else self.ref_dtype(caps)

    def small_layer(self, bq: Preset, caps: Capabilities, dtype: torch.dtype,
                    chunked: bool) -> tuple[nn.Module, PackedWeight]:
        """A ``gradcheck_shape`` LoRA layer over the quantizer with random (non-zero) LoRA A and B."""
        shape = fit_shape(self.gradcheck_shape, caps.out_multiple, caps.in_multiple)
        seed = self.seed * 1000 + 100
        h = synthetic_hessian(shape[1], seed) if caps.needs_calibration else None
        torch.manual_seed(seed)
        packed = bq.quantizer.quantize_weight(gaussian_weight(shape, seed, 0.5), bq.config, h)
        w = bq.quantizer.materialize(packed, dtype=dtype, device="cpu")
        require(tuple(w.shape) == shape and w.dtype == dtype,  # fail here, not deep inside F.linear
                f"{who(bq, 'materialize')}(packed, dtype={dtype}) returned shape {tuple(w.shape)} dtype "
                f"{w.dtype}; expected {shape} = [out, in] and {dtype}")
        layer = quantized_lora(packed, bq.quantizer, self.lora_rank, dtype,
                               chunk_rows=self.chunk_rows if chunked else None)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():  # B = 0 at init would hide every gradient through A
            for ab in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
                ab.copy_(torch.randn(ab.shape, generator=g, dtype=dtype) * 0.3)
        return layer, packed

    def path(self, caps: Capabilities, chunked: bool) -> str:
        """The quantizer methods the layer calls, for messages."""
        if caps.fast_path:
            return "matmul/matmul_T"
        return f"materialize(rows=...) in tiles of {self.chunk_rows}" if chunked else "materialize"

    @CHUNKED
    def test_lora_autograd_matches_dense_reference(self, bound_preset, capabilities, chunked) -> None:
        bq, caps = bound_preset, capabilities
        dt = self.compute_dtype(caps)
        layer, packed = self.small_layer(bq, caps, dt, chunked)
        g = torch.Generator().manual_seed(self.seed + 7)
        x = torch.randn(*self.gradcheck_batch, layer.in_features, generator=g, dtype=dt).requires_grad_()
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        y = layer(x)  # (..., out)
        gy = torch.randn(y.shape, generator=g, dtype=dt)
        grads = torch.autograd.grad(y, (x, a, b), gy)

        # the reference: dense float64 math on the same materialized weight
        w = bq.quantizer.materialize(packed, dtype=dt, device="cpu").to(torch.float64)  # (out, in)
        x64, a64, b64 = (t.detach().to(torch.float64).requires_grad_() for t in (x, a, b))
        y_ref = x64 @ w.T + layer.scaling["default"] * (x64 @ a64.T) @ b64.T
        refs = torch.autograd.grad(y_ref, (x64, a64, b64), gy.to(torch.float64))

        tol, knob = (self.grad_rtol_float64, "grad_rtol_float64") if dt == torch.float64 else (
            self.grad_rtol, "grad_rtol")
        via = f"{who(bq, self.path(caps, chunked))} through PEFT's LoRA over QuantizedLinear in {dt}"
        for name, got, ref in (("y (forward)", y, y_ref), ("grad x", grads[0], refs[0]),
                               ("grad lora_A", grads[1], refs[1]), ("grad lora_B", grads[2], refs[2])):
            require(tuple(got.shape) == tuple(ref.shape),
                    f"{via}: {name} has shape {tuple(got.shape)}; expected {tuple(ref.shape)}")
            err = rel_err(got, ref)
            require(err <= tol, f"{via}: {name} differs from the dense float64 reference by relative "
                    f"{err:.3g} > {knob}={tol:g}")
        for name, buf in layer.named_buffers():
            require(not buf.requires_grad and buf.grad is None, f"{via}: packed buffer {name} got a gradient")

    @CHUNKED
    def test_lora_gradcheck_float64(self, bound_preset, capabilities, chunked) -> None:
        if "float64" not in capabilities.dtypes:
            pytest.skip("Capabilities.dtypes has no float64, which gradcheck needs; "
                        "test_lora_autograd_matches_dense_reference compares against float64 instead")
        bq = bound_preset
        layer, _ = self.small_layer(bq, capabilities, torch.float64, chunked)
        g = torch.Generator().manual_seed(self.seed + 11)
        x = torch.randn(*self.gradcheck_batch, layer.in_features, generator=g, dtype=torch.float64)
        inputs = (x.requires_grad_(), layer.lora_A["default"].weight.detach().clone().requires_grad_(),
                  layer.lora_B["default"].weight.detach().clone().requires_grad_())

        def fn(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return torch.func.functional_call(
                layer, {"lora_A.default.weight": a, "lora_B.default.weight": b}, (x,))

        try:
            torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=self.gradcheck_fast_mode)
        except Exception as e:  # noqa: BLE001 - GradcheckError and friends become a named failure
            raise AssertionError(f"{who(bq, self.path(capabilities, chunked))}: torch.autograd.gradcheck of "
                                 f"PEFT's LoRA over QuantizedLinear (x, lora_A, lora_B) failed in float64: {e}") from e

    @CHUNKED
    def test_no_dense_weight_saved_for_backward(self, bound_preset, capabilities, weight_cases,
                                                chunked) -> None:
        bq = bound_preset
        case: WeightCase = max((c for c in weight_cases if c.kind == "gaussian"),
                               key=lambda c: c.shape[0] * c.shape[1])
        out_f, in_f = case.shape
        dt = self.ref_dtype(capabilities)
        self.dense(bq, case, dt)  # shape-checked: a wrong shape fails here with a message, not in F.linear
        layer = quantized_lora(case.packed, bq.quantizer, self.lora_rank, dt,
                               chunk_rows=self.chunk_rows if chunked else None)
        # a batch smaller than out, so that only a weight-sized tensor can reach out * in elements
        x = torch.randn(2, 3, in_f, dtype=dt, requires_grad=True)
        saved: list[tuple[tuple[int, ...], torch.dtype]] = []

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved.append((tuple(t.shape), t.dtype))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.backward(torch.ones_like(y))
        big = [s for s in saved if torch.Size(s[0]).numel() >= out_f * in_f]
        require(not big, f"{who(bq, self.path(capabilities, chunked))} through PEFT's LoRA over QuantizedLinear saved "
                f"{big} for backward, as many elements as the dense [{out_f}, {in_f}] weight: only the packed "
                "storage may outlive the forward (saved: " + ", ".join(str(s[0]) for s in saved) + ")")
        require(x.grad is not None and tuple(x.grad.shape) == tuple(x.shape),
                f"{who(bq, self.path(capabilities, chunked))}: backward gave no gradient for x")

    @CHUNKED
    def test_dora_matches_dense_reference(self, bound_preset, capabilities, chunked) -> None:
        """PEFT's DoRA over the quantizer against the same DoRA over the materialized weight in float64."""
        bq, caps = bound_preset, capabilities
        dt = self.compute_dtype(caps)
        layer, packed = self.small_layer(bq, caps, dt, chunked)
        layer = quantized_lora(packed, bq.quantizer, self.lora_rank, dt, use_dora=True,
                               chunk_rows=self.chunk_rows if chunked else None)
        dense = nn.Linear(layer.in_features, layer.out_features, bias=False, dtype=torch.float64)
        dense.weight = nn.Parameter(bq.quantizer.materialize(packed, dtype=torch.float64, device="cpu"),
                                    requires_grad=False)
        ref = lora_over(dense, self.lora_rank, torch.float64, use_dora=True)
        ours = {k: v for k, v in layer.state_dict().items() if "lora_" in k}
        ref.load_state_dict({k: v.to(torch.float64) for k, v in ours.items()}, strict=False)
        g = torch.Generator().manual_seed(self.seed + 17)
        x = torch.randn(*self.gradcheck_batch, layer.in_features, generator=g, dtype=dt).requires_grad_()
        x64 = x.detach().to(torch.float64).requires_grad_()
        y, y_ref = layer(x), ref(x64)
        gy = torch.randn(y.shape, generator=g, dtype=dt)
        params = [p for n, p in layer.named_parameters() if p.requires_grad]
        params_ref = [p for n, p in ref.named_parameters() if p.requires_grad]
        grads = torch.autograd.grad(y, [x, *params], gy)
        refs = torch.autograd.grad(y_ref, [x64, *params_ref], gy.to(torch.float64))
        names = ["y", "grad x", *(f"grad {n}" for n, p in layer.named_parameters() if p.requires_grad)]
        tol = self.dora_rtol_float64 if dt == torch.float64 else self.grad_rtol
        via = f"{who(bq, self.path(caps, chunked))} through PEFT's DoRA in {dt}"
        require(len(params) == 3, f"{via}: expected lora_A, lora_B and the magnitude to train, got {names[2:]}")
        for name, got, want in zip(names, (y, *grads), (y_ref, *refs), strict=True):
            err = rel_err(got, want)
            require(err <= tol, f"{via}: {name} differs from the float64 dense DoRA by relative {err:.3g} > {tol:g}")

    def test_fast_path_matches_materialize(self, bound_preset, capabilities, weight_cases) -> None:
        if not capabilities.fast_path:
            pytest.skip("Capabilities.fast_path is False: no matmul/matmul_T to check")
        bq, q = bound_preset, bound_preset.quantizer
        dt = self.ref_dtype(capabilities)
        g = torch.Generator().manual_seed(self.seed + 13)
        for case in (c for c in weight_cases if c.kind == "gaussian"):
            out_f, in_f = case.shape
            w = q.materialize(case.packed, dtype=dt, device="cpu")  # (out, in)
            x = torch.randn(2, 3, in_f, generator=g).to(dt)
            gy = torch.randn(2, 3, out_f, generator=g).to(dt)
            for method, got, ref in (("matmul", q.matmul(x, case.packed), x @ w.T),
                                     ("matmul_T", q.matmul_T(gy, case.packed), gy @ w)):
                require(tuple(got.shape) == tuple(ref.shape), f"{who(bq, method)} returned shape "
                        f"{tuple(got.shape)}; expected {tuple(ref.shape)} for the {case}")
                err = rel_err(got, ref)
                require(err <= self.fast_path_rtol, f"{who(bq, method)} differs from the materialized weight's "
                        f"product by relative {err:.3g} > fast_path_rtol={self.fast_path_rtol:g} for the {case}")

