"""Nothing silently wrong (issue 13): every bad input a new user tries ends in ``error: ...`` naming what is
wrong and what would be right, or in correct behaviour. Real subprocesses on the tiny model where a whole
run is needed; in-process (the same typer app the console script runs) for what fails before any model
loads."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modulora.finetune.tiny import interrupt_modulora, run_modulora, tiny_llama_dir

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()


modulora = run_modulora


def in_process(*args: object) -> tuple[int, str]:
    from modulora.cli import _register, app

    _register()
    r = CliRunner().invoke(app, list(map(str, args)))
    return r.exit_code, " ".join(r.output.split())


def error_of(p: subprocess.CompletedProcess) -> str:
    assert p.returncode == 2, (p.returncode, p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    return " ".join(p.stderr[p.stderr.index("error:"):].split())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """The tiny model's directory, with ``train.jsonl`` (prompt/completion records) beside it."""
    d = tiny_llama_dir(tmp_path_factory.mktemp("tiny") / "model")
    rows = [{"prompt": f"Repeat {w}", "completion": f"{w} {w}"} for w in WORDS]
    (d.parent / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


@pytest.fixture(scope="module")
def data(tiny) -> Path:
    return tiny.parent / "train.jsonl"


def test_runs_in_out_are_never_mixed(tiny, data, tmp_path):
    out = tmp_path / "run"
    common = ["--model", tiny, "--quantizer", "rtn-4bit", "--data", data, "--out", out, "--eval-size", "2",
              "--batch-size", "4", "--save-steps", "1", "--logging-steps", "1"]
    modulora("finetune", *common, "--max-steps", "2", "--save-total-limit", "3")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2"]
    # a fresh run into the same --out is refused: a later --resume would continue the old run
    err = error_of(modulora("finetune", *common, "--max-steps", "3", check=False))
    assert "holds an earlier run" in err and "--resume" in err and "--overwrite" in err, err
    # a resume refused for another quantizer changes nothing, and its hint names options, not Python
    saved = (out / "run_config.json").read_bytes()
    err = error_of(modulora("finetune", "--out", out, "--resume", "--quantizer", "nf4", check=False))
    assert "quantizer (--quantizer" in err and '"rtn-4bit"' in err and '"nf4"' in err and "=True" not in err
    assert (out / "run_config.json").read_bytes() == saved
    other = tmp_path / "other.jsonl"
    other.write_text(data.read_text().replace("Repeat", "Echo"))
    err = error_of(modulora("finetune", "--out", out, "--resume", "--data", other, check=False))
    assert "data (--data/--task)" in err, err
    # a truncated optimizer.pt in the last checkpoint names it and the one to resume from
    opt = out / "checkpoints" / "checkpoint-2" / "optimizer.pt"
    opt.write_bytes(opt.read_bytes()[:100])
    err = error_of(modulora("finetune", "--out", out, "--resume", "--max-steps", "3", check=False))
    assert "checkpoint-2 is damaged: optimizer.pt" in err and "resume from checkpoint-1" in err, err
    shutil.rmtree(out / "checkpoints" / "checkpoint-2")
    r = modulora("finetune", "--out", out, "--resume", "--max-steps", "3")
    assert "resuming from" in r.stderr and "checkpoint-1" in r.stderr
    # --overwrite starts afresh, and says what it removes
    r = modulora("finetune", *common, "--max-steps", "1", "--overwrite")
    assert "removing the earlier run" in r.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-1"]
    assert json.loads((out / "metrics.json").read_text())["steps"] == 1


def test_non_causal_and_nan_models_are_refused(tmp_path, data):
    import torch
    from transformers import BertConfig, BertModel, LlamaForCausalLM

    bert = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(bert)
    err = error_of(modulora("finetune", "--model", bert, "--quantizer", "rtn-4bit", "--data", data, "--out",
                            tmp_path / "o1", check=False))
    assert "is a BertModel" in err and "not a causal language model" in err, err
    nan = tiny_llama_dir(tmp_path / "nan")
    m = LlamaForCausalLM.from_pretrained(nan)
    with torch.no_grad():
        m.model.norm.weight[5] = float("nan")
    m.save_pretrained(nan)
    err = error_of(modulora("finetune", "--model", nan, "--quantizer", "rtn-4bit", "--data", data, "--out",
                            tmp_path / "o2", check=False))
    assert "model.norm.weight (1 NaN/inf)" in err, err
    assert not (tmp_path / "o2" / "adapter").exists()


class _NoNetwork:
    """Records (and refuses) every outgoing connection: the system edge where 'offline' is decided."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.attempts: list[object] = []

        def connect(sock, address, *a, **k):
            self.attempts.append(address)
            raise OSError("network disabled in this test")

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: connect(None, address))


def test_missing_paths_are_refused_at_once_offline(tmp_path, monkeypatch, tiny):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    net = _NoNetwork(monkeypatch)
    cases = [
        (("finetune", "--model", tmp_path / "nosuch", "--out", tmp_path / "o"), "nosuch does not exist"),
        (("quantize", tmp_path / "nosuch", "--quantizer", "rtn-4bit"), "MODEL"),
        (("eval", "--model", "some-org/some-model", "--task", "docsum"), "no model 'some-org/some-model' in "
         "the local Hugging Face cache"),
        (("generate", "--model", tmp_path, "--prompt", "x"), "not a model directory: it has no config.json"),
    ]
    for args, want in cases:
        code, output = in_process(*args)
        assert code == 2 and want in output, (args, output[-800:])
    (tmp_path / "ad").mkdir()
    (tmp_path / "ad" / "adapter_config.json").write_text("{}")
    code, output = in_process("generate", "--model", tiny, "--quantizer", "rtn-4bit", "--adapter",
                              tmp_path / "ad", "--prompt", "x")
    assert code == 2 and "lacks the adapter's weights adapter_model.safetensors" in output, output[-800:]
    assert net.attempts == []


def test_model_directories_with_a_file_deleted(tmp_path, tiny):
    import modulora

    base = tmp_path / "base"
    modulora.save_quantized(modulora.load(str(tiny), "rtn-4bit", lora=None), base)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tiny / "config.json", legacy)
    (legacy / "modulora_model.safetensors").write_bytes(b"")  # 0.1 weights whose index was deleted
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny, sharded)
    os.replace(sharded / "model.safetensors", sharded / "model-00001-of-00002.safetensors")
    cases = [(legacy, "its index modulora_quant.json is missing"),
             (sharded, "index (model.safetensors.index.json) is missing")]
    for d, want in cases:
        code, output = in_process("eval", "--model", d, "--perplexity", tiny / "config.json")
        assert code == 2 and want in output, output[-800:]


def test_null_completion_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "x", "completion": null}\n')
    code, output = in_process("finetune", "--data", bad, "--out", tmp_path / "o")
    assert code == 2 and "record 2: 'completion' is null; give each a string" in output, output


def test_ctrl_c_while_scoring_says_how_to_go_on(tiny, tmp_path):
    out = tmp_path / "out"
    # scoring 64 answers takes a while: the Ctrl-C lands in it
    code, rest = interrupt_modulora("finetune", "--model", tiny, "--quantizer", "rtn-4bit", "--task", "docsum",
                                    "--out", out, "--eval-size", "64", "--max-steps", "1", when="before finetuning")
    assert code == 130, rest[-2000:]
    assert "interrupted" in rest and "no training step was saved yet" in rest and "--resume" in rest, rest
    r = modulora("finetune", "--out", out, "--resume", "--eval-size", "2")  # starts training, reusing base/
    assert "quantizing" not in r.stderr and json.loads((out / "metrics.json").read_text())["steps"] == 1
