"""Two processes with torchrun and with ``accelerate launch`` (DDP, gloo on CPU) on a tiny model: the logged
loss matches a single-process run with the same global batch, the packed base is not broadcast, and one
adapter (PEFT format) comes out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modulora.finetune.tiny import tiny_llama_dir

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


def _finetune(launcher: list[str], tiny: Path, data: Path, out: Path, batch: int, env: dict | None = None) -> dict:
    cmd = [*launcher, "-m", "modulora", "finetune", "--model", str(tiny), "--quantizer", "rtn-4bit",
           "--data", str(data), "--out", str(out), "--max-steps", "4", "--batch-size", str(batch),
           "--logging-steps", "1", "--eval-size", "0", "--lr", "5e-3"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=600)
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


@pytest.fixture(scope="module")
def single(setup) -> dict:
    """The one-process reference run, global batch 4; shared by both launchers' tests."""
    tiny, data, d = setup
    return _finetune([sys.executable], tiny, data, d / "one", batch=4)


def _assert_matches_single(one: dict, two: dict, out: Path) -> None:
    assert two["world_size"] == 2 and one["world_size"] == 1
    l1, l2 = dict(map(tuple, one["loss_history"])), dict(map(tuple, two["loss_history"]))
    assert sorted(l1) == sorted(l2) == [1, 2, 3, 4]
    for step in l1:
        assert l2[step] == pytest.approx(l1[step], rel=1e-4), (step, l1, l2)
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert not list(out.glob("checkpoints/*/model*.safetensors"))


def test_torchrun_two_processes_match_one(setup, single):
    tiny, data, d = setup
    two = _finetune([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                     "--master_port", "29561"], tiny, data, d / "two", batch=2)
    _assert_matches_single(single, two, d / "two")


def test_accelerate_launch_two_processes_match_one(setup, single, tmp_path):
    tiny, data, d = setup
    # accelerate 1.x: "--cpu --num_processes 2" starts ONE process unless MPI is set up (checked: world
    # size 1); "--multi_gpu" starts them with torch's launcher and runs on CPU too (gloo). Every option is
    # given and HF_HOME points to an empty folder, so no accelerate config of this machine is read.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", "29562"]
    env = {**ENV, "HF_HOME": str(tmp_path / "hf"), "CUDA_VISIBLE_DEVICES": ""}
    two = _finetune(launcher, tiny, data, d / "accelerate", batch=2, env=env)
    _assert_matches_single(single, two, d / "accelerate")


def test_stop_flag_lives_where_the_backend_reduces(monkeypatch):
    """NCCL rejects a CPU tensor in a collective: under an NCCL group the stop flag must be a CUDA tensor
    (the old flag was always ``torch.tensor([stop])`` on the CPU), under gloo a CPU one."""
    import torch

    from modulora.finetune import train

    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "nccl")
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert train.collective_device() == torch.device("cuda", 1)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda *a, **k: "gloo")
    assert train.collective_device() == torch.device("cpu")

    # the callback builds its flag on that device and reduces it there (meta stands in for cuda here)
    seen = []
    monkeypatch.setattr(train, "collective_device", lambda: torch.device("meta"))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op=None: seen.append(t.device))
    with pytest.raises(Exception):  # noqa: B017 - .item() of a meta flag: the reduce already happened
        train.GracefulStop().on_step_end(None, None, None)
    assert seen == [torch.device("meta")]
