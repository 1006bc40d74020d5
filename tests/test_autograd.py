"""The quantization-agnostic backward under PEFT's LoRA: gradients, chunking, what is saved for backward."""

from __future__ import annotations

import pytest
import torch

import modulora
from modulora_core.autograd import quantized_matmul
from modulora_core.qlinear import QuantizedLinear
from modulora_core.testing.autograd_checks import lora_over


def make_layer(out_f=48, in_f=64, preset="rtn-4bit", r=4, chunk_rows=None, bias=True, seed=0):
    """PEFT's LoRA layer (random A and B) over a QuantizedLinear."""
    g = torch.Generator().manual_seed(seed)
    bq = modulora.get_preset(preset)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    torch.manual_seed(seed)
    return lora_over(QuantizedLinear(bq.quantize(w), bq.quantizer, bias=b, chunk_rows=chunk_rows), r, torch.float32)


def A(layer):
    return layer.lora_A["default"].weight


def B(layer):
    return layer.lora_B["default"].weight


def dense_reference(layer, x: torch.Tensor):
    """The same layer as plain float64 autograd on the materialized weight."""
    base = layer.get_base_layer()
    w = base.dequantize(torch.float64)
    a = A(layer).detach().double().requires_grad_()
    b = B(layer).detach().double().requires_grad_()
    x = x.detach().double().requires_grad_()
    y = x @ w.T + base.bias.double() + layer.scaling["default"] * (x @ a.T @ b.T)
    return x, a, b, y


@pytest.mark.parametrize("chunk_rows", [None, 7, 16, 48, 1000])
def test_gradients_match_dense_float64_reference(chunk_rows):
    layer = make_layer(chunk_rows=chunk_rows)
    x = torch.randn(3, 5, 64, requires_grad=True)
    y = layer(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    xr, ar, br, yr = dense_reference(layer, x)
    yr.backward(gy.double())
    torch.testing.assert_close(y.double(), yr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(A(layer).grad.double(), ar.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(B(layer).grad.double(), br.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_rows", [None, 5])
def test_gradcheck_base_path_float64(chunk_rows):
    bq = modulora.get_preset("rtn-3bit")
    packed = bq.quantize(torch.randn(12, 16))
    x = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda t: quantized_matmul(t, bq.quantizer, packed, chunk_rows=chunk_rows), (x,)
    )


def test_packed_storage_and_frozen_parts_get_no_gradient():
    layer = make_layer()
    layer(torch.randn(2, 64)).sum().backward()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"lora_A.default.weight", "lora_B.default.weight"}
    assert layer.get_base_layer().bias.grad is None
    for name, buf in layer.named_buffers():
        assert name.startswith("base_layer.packed_") and not isinstance(buf, torch.nn.Parameter)
        assert buf.grad is None


@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_no_dense_weight_saved_for_backward(chunk_rows):
    out_f, in_f = 96, 128
    layer = make_layer(out_f, in_f, chunk_rows=chunk_rows)
    dense_numel = out_f * in_f
    x = torch.randn(5, in_f, requires_grad=True)  # 5*128 elements: never mistaken for W's 96*128
    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    y.sum().backward()
    assert saved, "LoRA's own autograd should save something (its activation and A/B)"
    assert all(torch.Size(s).numel() < dense_numel for s in saved), saved
    # the base path saves no activation either: only LoRA tensors (x for A's grad, A(x) for B's grad, A, B)
    assert sum(1 for s in saved if tuple(s) == tuple(x.shape)) <= 1


def test_dtype_follows_input_and_grad_dtype_matches():
    layer = make_layer(chunk_rows=8)
    for p in layer.parameters():
        p.data = p.data.double()
    x = torch.randn(2, 64, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float64
    y.sum().backward()
    assert x.grad.dtype == torch.float64


def test_bfloat16_input_runs_and_is_close():
    layer = make_layer()
    x = torch.randn(4, 64)
    y32 = layer(x)
    y16 = layer(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=1e-1)


def test_adapter_disabled_gives_base_only():
    layer = make_layer(bias=False)
    x = torch.randn(3, 64)
    layer.enable_adapters(False)
    base = layer(x)
    torch.testing.assert_close(base, x @ layer.get_base_layer().dequantize(torch.float32).T)
    assert not torch.equal(make_layer(bias=False)(x), base)


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_chunk_rows_is_a_clear_error(bad):
    with pytest.raises(modulora.ModuLoRAError, match="chunk_rows"):
        make_layer(chunk_rows=bad)
