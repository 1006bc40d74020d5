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
