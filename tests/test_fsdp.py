"""FSDP2 (issue 16): two processes (torchrun, gloo, CPU) shard every plugin's packed storage of a tiny Llama,
each holding about half of it; 10 training steps give the losses of one process with the same global batch;
the gathered adapter loads in stock PEFT and equals the one-process adapter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modulora.finetune.tiny import tiny_llama_dir

sys.path.insert(0, str(Path(__file__).parent))
import fsdp_worker  # noqa: E402

PRESETS = ["rtn", "nf4", "optq", "quip#", "hqq"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


def _slug(preset: str) -> str:
    return preset.replace("#", "sharp")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """One torchrun launch, 2 processes, trains every preset in turn (one start-up for all five)."""
    d = tmp_path_factory.mktemp("fsdp")
    tiny = tiny_llama_dir(d / "tiny")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573",
           str(Path(__file__).parent / "fsdp_worker.py"), str(tiny), str(d / "out"), *PRESETS]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return tiny, d / "out"


@pytest.mark.parametrize("preset", PRESETS)
def test_two_processes_shard_the_packed_bytes_and_match_one(runs, preset):
    tiny, out = runs
    two = json.loads((out / f"{_slug(preset)}.json").read_text())
    half = two["full_packed_bytes"] / 2
    for b in two["per_rank_packed_bytes"]:
        assert b == pytest.approx(half, rel=0.05), (two["per_rank_packed_bytes"], two["full_packed_bytes"])

    one = fsdp_worker.train(tiny, preset, shard=False)
    assert one["full_packed_bytes"] == two["full_packed_bytes"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)

    # the adapter saved by the FSDP run loads in stock PEFT over the dense model, equal to one process's
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32)
    loaded = PeftModel.from_pretrained(dense, str(out / _slug(preset)))
    got = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    want = {n: p for n, p in one["model"].named_parameters() if "lora_" in n}
    assert got and sorted(got) == sorted(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n].detach(), rtol=1e-3, atol=1e-4)  # Adam: tiny reduction-order differences


def test_flat_packed_parameters_change_nothing_unsharded():
    """Packed buffers become flat frozen parameters; the layer's output and ``packed`` shapes stay the same."""
    from torch import nn

    from modulora_core import get_preset
    from modulora_core.fsdp import local_packed_bytes, packed_as_parameters
    from modulora_core.surgery import replace_linear

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48))
    bq = get_preset("nf4")
    replace_linear(model, "0", bq.quantize(model[0].weight.detach()), bq)
    layer, x = model[0], torch.randn(3, 32)
    before, shapes, nbytes = layer(x), {k: t.shape for k, t in layer.packed.tensors.items()}, local_packed_bytes(model)
    assert packed_as_parameters(model) == len(shapes) and packed_as_parameters(model) == 0
    assert not list(layer.buffers()) and all(p.ndim == 1 and not p.requires_grad for p in layer.parameters())
    assert {k: t.shape for k, t in layer.packed.tensors.items()} == shapes
    assert local_packed_bytes(model) == nbytes and layer.device == x.device
    torch.testing.assert_close(layer(x), before)
