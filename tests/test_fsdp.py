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

    assert two["refused"].startswith("ModuLoRAError") and "is sharded by FSDP2" in two["refused"]

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


ACCELERATE_FSDP = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_reshard_after_forward: true
  fsdp_state_dict_type: FULL_STATE_DICT
num_processes: 2
num_machines: 1
machine_rank: 0
use_cpu: true
mixed_precision: 'no'
main_process_port: 29575
"""


def _finetune(nproc: int, tiny: Path, data: Path, out: Path, *extra: str, accelerate: Path | None = None) -> dict:
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                   "--nproc_per_node", str(nproc), "--master_port", "29574"]
    if accelerate is not None:  # accelerate launch with an FSDP config file, no --fsdp
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate)]
    cmd = [*launcher, "-m", "modulora", "finetune", "--model", str(tiny), "--quantizer", "nf4", "--data", str(data),
           "--out", str(out), "--max-steps", "5", "--save-steps", "3", "--batch-size", str(4 // nproc),
           "--logging-steps", "1", "--eval-size", "0", "--lr", "5e-3", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert p.returncode == 0, p.stderr[-4000:]
    return json.loads((out / "metrics.json").read_text())


def test_finetune_fsdp_matches_one_process_and_resumes(tmp_path):
    """``torchrun ... modulora finetune --fsdp``, and ``accelerate launch`` with an FSDP config: each process
    holds half the packed bytes; the losses and the adapter (saved once, PEFT format) are those of one process; ``--resume`` from the step-3 checkpoint
    (adapter and sharded optimizer state) gives steps 4 and 5 of one process again. (5 steps: the 23
    examples give 5 full global batches of 4; a sixth would be split unevenly between the processes.)"""
    import shutil

    from safetensors.torch import load_file

    tiny = tiny_llama_dir(tmp_path / "tiny")
    data = tmp_path / "train.jsonl"
    words = [f"{a}{b}" for a in "abcdefgh" for b in "xyz"]  # equal lengths: equal tokens per process
    data.write_text("".join(json.dumps({"prompt": f"Say {w}", "completion": f"{w}!"}) + "\n" for w in words))
    one = _finetune(1, tiny, data, tmp_path / "one")
    two = _finetune(2, tiny, data, tmp_path / "two", "--fsdp")
    assert two["world_size"] == 2 and len(two["packed_bytes_per_process"]) == 2
    for b in two["packed_bytes_per_process"]:
        assert b == pytest.approx(one["packed_bytes_per_process"][0] / 2, rel=0.05)
    l1 = dict(map(tuple, one["loss_history"]))
    assert sorted(l1) == [1, 2, 3, 4, 5]

    def same_as_one(run: Path) -> None:
        l2 = dict(map(tuple, json.loads((run / "metrics.json").read_text())["loss_history"]))
        assert sorted(l2) == sorted(l1)
        assert [l2[s] for s in l1] == pytest.approx([l1[s] for s in l1], rel=1e-4)
        a = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
        b = load_file(run / "adapter" / "adapter_model.safetensors")
        assert sorted(a) == sorted(b)
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-4)

    same_as_one(tmp_path / "two")

    # accelerate launch with the Trainer's FSDP config (no --fsdp): the same sharding, the same run
    config = tmp_path / "fsdp.yaml"
    config.write_text(ACCELERATE_FSDP)
    acc = _finetune(2, tiny, data, tmp_path / "acc", accelerate=config)
    assert acc["packed_bytes_per_process"] == two["packed_bytes_per_process"]
    same_as_one(tmp_path / "acc")

    shutil.rmtree(tmp_path / "two" / "checkpoints" / "checkpoint-5")
    shutil.rmtree(tmp_path / "two" / "adapter")
    _finetune(2, tiny, data, tmp_path / "two", "--fsdp", "--resume")
    same_as_one(tmp_path / "two")


def test_plan_per_process_under_fsdp_and_ddp():
    """``plan(..., world_size=2, fsdp=True)``: packed base, LoRA state and the unquantized parts halved (the
    root's final norm gathered whole besides: the embeddings and lm_head are units of their own), two
    blocks' packed bytes or the lm_head and one block all-gathered, the process group's runtime added; DDP only adds the runtime. ``modulora plan --world-size 2 --fsdp --json`` says the same."""
    from typer.testing import CliRunner

    from modulora.cli import _register, app
    from modulora.planning import plan
    from modulora.planning.sharding import DISTRIBUTED_RUNTIME, block_of
    from modulora_core import get_preset
    from modulora_core.errors import ModuLoRAError

    one = plan("smollm2-135m", "rtn-2bit", batch_size=2, seq_len=64)
    ddp = plan("smollm2-135m", "rtn-2bit", batch_size=2, seq_len=64, world_size=2)
    fsdp = plan("smollm2-135m", "rtn-2bit", batch_size=2, seq_len=64, world_size=2, fsdp=True)
    c1, cd, cf = ({c.key: c.nbytes for c in p.components} for p in (one, ddp, fsdp))
    assert ddp.total == one.total + DISTRIBUTED_RUNTIME["cpu"]
    assert cf["packed"] == -(-c1["packed"] // 2) and cf["lora"] == -(-c1["lora"] // 2)
    assert cf["activations"] == c1["activations"] and cf["runtime"] == cd["runtime"]
    bq = get_preset("rtn-2bit")
    block0 = sum(bq.quantizer.packed_nbytes(s, bq.config) for s in
                 [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)])
    tied = 49152 * 576 * 4  # embeddings and lm_head tied: one FSDP unit, counted once
    assert cf["gathered"] == max(2 * block0, block0 + tied)  # at the loss: the lm_head and the last block
    assert cf["unquantized"] == 576 * 4 + -(-c1["unquantized"] // 2)  # only the final norm gathered whole
    from transformers import LlamaConfig

    from modulora.planning.shapes import model_shapes
    from modulora.planning.sharding import embedding_unit_params

    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=300)
    for tie, units in ((True, [300 * 64]), (False, [300 * 64, 300 * 64])):
        config = LlamaConfig(**dims, tie_word_embeddings=tie, architectures=["LlamaForCausalLM"])
        assert embedding_unit_params(model_shapes(config, None)) == units
    assert block_of("model.layers.12.mlp.up_proj") == 12 and block_of("model.norm.weight") is None
    with pytest.raises(ModuLoRAError, match="world_size"):
        plan("smollm2-135m", "rtn-2bit", world_size=0)

    _register()
    r = CliRunner().invoke(app, ["plan", "smollm2-135m", "-q", "rtn-2bit", "--batch-size", "2", "--seq-len", "64",
                                 "--world-size", "2", "--fsdp", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    assert got["total_bytes"] == fsdp.total and got["settings"]["fsdp"] and got["settings"]["world_size"] == 2


@pytest.mark.parametrize("tied", [True, False])
def test_embeddings_and_lm_head_are_units_of_their_own(tied):
    """The input embedding and the lm_head are FSDP units apart from the root, one unit when tied (the tie
    kept); the sharded model's loss is the unsharded one's. One gloo process: the units, not the split."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FSDPModule
    from transformers import LlamaConfig, LlamaForCausalLM

    import modulora
    from modulora_core.fsdp import embedding_units, shard_model

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=300, tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = modulora.load(LlamaForCausalLM(config), "rtn", lora=None)
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert embedding_units(model) == ([[emb, head]] if tied else [emb, head])
    ids = torch.randint(300, (2, 8), generator=torch.Generator().manual_seed(0))
    want = model(input_ids=ids, labels=ids).loss.detach()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_model(model)
        assert isinstance(emb, FSDPModule) and isinstance(head, FSDPModule)
        assert (emb.weight is head.weight) == tied
        root = model.model.norm.weight  # the final norm stays in the root unit, which holds nothing else
        assert not isinstance(model.model.norm, FSDPModule) and hasattr(root, "to_local")
        torch.testing.assert_close(model(input_ids=ids, labels=ids).loss.detach(), want)
    finally:
        dist.destroy_process_group()
