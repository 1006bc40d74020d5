"""On a GPU (``pytest -m cuda``; ``python -m benchmarks.gpu`` runs these): each first-party quantizer
quantizes, materializes and trains where the weight is, in bfloat16, with no host sync in forward/backward.
Skipped without CUDA; the CPU suite covers the same discipline through DeviceGuard."""

from __future__ import annotations

import pytest
import torch

import modulora
from modulora_core.testing import DeviceGuard, synthetic_hessian
from modulora_core.testing.autograd_checks import quantized_lora

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
PRESETS = ["rtn-4bit", "nf4", "optq-4bit", "quip#-2bit", "hqq-4bit"]


@pytest.mark.parametrize("preset", PRESETS)
def test_quantize_and_train_on_the_gpu(preset: str) -> None:
    bq = modulora.get_preset(preset)
    w = torch.randn(256, 512, device="cuda") * 0.02
    h = synthetic_hessian(512, 0).cuda() if bq.capabilities().needs_calibration else None
    packed = bq.quantize(w, h)
    assert all(t.device.type == "cuda" for t in packed.tensors.values())
    layer = quantized_lora(packed, bq.quantizer, 8, torch.bfloat16)
    assert all(p.device.type == "cuda" for p in layer.parameters())  # the new layer, LoRA included
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()  # warm-up: per-device caches
    with DeviceGuard(f"{preset} on CUDA", forbid_sync=True):
        y = layer(x)
        y.sum().backward()
    ref = x.detach().double() @ bq.quantizer.materialize(packed, dtype=torch.float64).T
    assert float((y.double() - ref).norm() / ref.norm()) < 3e-2


def test_materialize_is_compiled_on_cuda() -> None:
    from modulora_core.kernels import Kernel

    assert Kernel(lambda t: t).wants_compile(torch.device("cuda"))
