"""Two processes with torchrun (DDP, gloo on CPU) on a tiny model: the logged loss matches a single-process
run with the same global batch, the packed base is not broadcast, and one adapter comes out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modulora_core.tiny import tiny_llama_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


def _finetune(launcher: list[str], tiny: Path, data: Path, out: Path, batch: int) -> dict:
    cmd = [*launcher, "-m", "modulora", "finetune", "--model", str(tiny), "--quantizer", "rtn-4bit",
           "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-size", str(batch),
           "--logging-steps", "1", "--eval-size", "0", "--lr", "5e-3"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("ddp")
    data = d / "train.jsonl"
    # equal-length examples: each process's share of a batch then has the same number of tokens
    words = [f"{a}{b}" for a in "abcdefgh" for b in "xyz"]
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": f"{w}!"}) + "\n" for w in words))
    return tiny_llama_dir(d / "tiny"), data, d


def test_torchrun_two_processes_match_one(setup):
    tiny, data, d = setup
    one = _finetune([sys.executable], tiny, data, d / "one", batch=4)
    two = _finetune([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", "29561"], tiny, data, d / "two", batch=2)
    assert two["world_size"] == 2 and one["world_size"] == 1
    l1, l2 = dict(map(tuple, one["loss_history"])), dict(map(tuple, two["loss_history"]))
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), (step, l1, l2)
    assert (d / "two" / "adapter" / "adapter_model.safetensors").is_file()
    assert not list((d / "two").glob("checkpoints/*/model*.safetensors"))
