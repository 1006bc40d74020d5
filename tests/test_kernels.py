"""modulora_core.kernels: where kernels compile, and the eager fallback when compiling fails."""

from __future__ import annotations

import pytest
import torch

from modulora_core import kernels
from modulora_core.kernels import ENV, compile_mode, kernel


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_mode_reads_the_environment(monkeypatch) -> None:
    for value, mode in (("0", "0"), ("1", "1"), ("auto", "auto"), ("yes", "auto")):
        monkeypatch.setenv(ENV, value)
        assert compile_mode() == mode
    monkeypatch.setenv(ENV, "auto")  # auto: CUDA only, since CPU compilation costs seconds per shape
    k = kernel(_double)
    assert k.wants_compile(torch.device("cuda")) and not k.wants_compile(torch.device("cpu"))


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch) -> None:
    calls = []

    def broken_compile(fn, **kw):
        def run(*a):
            calls.append(1)
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    k = kernel(_double)
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match="running it eagerly"):
        assert torch.equal(k(x), x * 2)
    assert torch.equal(k(x), x * 2) and len(calls) == 1  # not retried


def test_decode_steps_take_matmul_small_only_where_kernels_compile(monkeypatch) -> None:
    import modulora
    from modulora_core import QuantizedLinear

    bq = modulora.get_preset("rtn-4bit")
    layer = QuantizedLinear(bq.quantize(torch.randn(16, 64)), bq.quantizer)
    calls = []
    real = bq.quantizer.matmul_small
    monkeypatch.setattr(bq.quantizer, "matmul_small", lambda x, p: calls.append(x.shape) or real(x, p))
    x = torch.randn(1, 64)
    monkeypatch.setenv(ENV, "0")
    y_eager = layer(x)  # eager CPU: materialize + F.linear
    assert calls == []
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(kernels.torch, "compile", lambda fn, **kw: fn)  # "compiled" = the same function here
    y = layer(x)
    assert calls == [(1, 64)]
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    layer(torch.randn(5, 64))  # more rows than SMALL_BATCH: materialize
    assert calls == [(1, 64)]
