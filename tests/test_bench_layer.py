"""benchmarks/bench_layer.py: the 0.1 reference layer computes what PEFT's layer computes, on a small layer."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_layer import V01, Design01LoRA, base_of, build, label, paired_ratio, step


@pytest.mark.parametrize("kind", ["chunk=none", "chunk=5"])
def test_design01_matches_peft_layer(kind: str) -> None:
    new, old = build(kind, 16, "rtn-4bit", 4), build(V01 + kind, 16, "rtn-4bit", 4)
    assert isinstance(old, Design01LoRA) and base_of(new).chunk_rows == base_of(old).chunk_rows
    x = torch.randn(3, 16, requires_grad=True)
    y_new = new(x)
    (gx_new,) = torch.autograd.grad(y_new.sum(), x)
    y_old = old(x)
    (gx_old,) = torch.autograd.grad(y_old.sum(), x)
    torch.testing.assert_close(y_new, y_old, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_new, gx_old, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new.lora_B["default"].weight, old.lora_B.weight)  # the same adapter


def test_step_leaves_no_gradients_behind() -> None:
    layer = build("chunk=none", 16, "rtn-4bit", 4)
    x = torch.randn(3, 16, requires_grad=True)
    step(layer, x)
    assert x.grad is None and all(p.grad is None for p in layer.parameters())


def test_labels_and_paired_ratio() -> None:
    assert label(V01 + "chunk=256", "rtn-4bit") == "0.1 design (own LoRA layer) rtn-4bit, chunk_rows=256"
    assert label("nf4:generic", "rtn-4bit") == "ModuLoRA nf4, generic (materialize)"
    med, q1, q3 = paired_ratio([1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert (med, q1, q3) == (3.0, 2.0, 4.0)
