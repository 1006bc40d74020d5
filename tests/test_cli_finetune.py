"""The `modulora` command end to end in real subprocesses on a tiny model: finetune (own data), resume,
Ctrl-C, eval, generate, merge (dense and re-quantized), quantize; quantization targets apart from LoRA
targets, DoRA and rsLoRA; bad input gives `error: ...` and exit status 2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from modulora.finetune.tiny import interrupt_modulora, run_modulora, tiny_llama_dir

modulora = run_modulora


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"Repeat {w}", "completion": f"{w} {w}"} for w in
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho".split()]
    rows += [{"instruction": "Add", "input": "2 and 3", "output": "5"}, {"text": "plain text is learned whole"}]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def finetune_and_resume(tiny: Path, data: Path, out: Path) -> Path:
    """A finetune of 4 steps with a checkpoint at 2, then resumed to 6 steps."""
    common = ["--model", tiny, "--quantizer", "rtn-4bit", "--data", data, "--out", out, "--batch-size", "4",
              "--logging-steps", "1", "--save-steps", "2", "--eval-size", "4", "--lr", "5e-3"]
    p = modulora("finetune", *common, "--max-steps", "4")
    assert "adapter (PEFT format)" in p.stdout and "modulora generate --model" in p.stdout, p.stdout
    first = json.loads((out / "metrics.json").read_text())
    r = modulora("finetune", "--out", out, "--resume", "--max-steps", "6")
    assert "resuming from" in r.stderr and "checkpoint-4" in r.stderr, r.stderr[-2000:]
    second = json.loads((out / "metrics.json").read_text())
    assert second["before"] == first["before"] and second["steps"] == 6
    assert [s for s, _ in second["loss_history"]] == [1, 2, 3, 4, 5, 6]
    return out


def test_finetune_resume_eval_generate_merge(tiny, data, tmp_path):
    # one test, so that pytest-xdist runs the finetune once (a module fixture would run once per worker)
    run = finetune_and_resume(tiny, data, tmp_path / "out")
    _check_outputs(run)
    _check_eval_generate_merge(run, data, tmp_path)
    _check_adapter_for_another_quantizer_is_refused(run, tiny, tmp_path)


def _check_outputs(run: Path) -> None:
    m = json.loads((run / "metrics.json").read_text())
    assert m["after"]["loss"] < m["before"]["loss"]
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "base" / "config.json").is_file()
    for ck in (run / "checkpoints").iterdir():
        assert ck.name.startswith("checkpoint-"), ck
        files = set(os.listdir(ck))
        assert "adapter_model.safetensors" in files and "optimizer.pt" in files
        assert not any(f.startswith("model") or f.startswith("modulora_model") for f in files), files


def _check_eval_generate_merge(run: Path, data: Path, tmp_path: Path) -> None:
    e = modulora("eval", "--model", run / "base", "--adapter", run / "adapter", "--data", data, "--json")
    after = json.loads((run / "metrics.json").read_text())["after"]["loss"]
    assert json.loads(e.stdout)["loss"] == pytest.approx(after, rel=1e-4)
    g = modulora("generate", "--model", run / "base", "--adapter", run / "adapter", "--prompt", "Repeat mu",
                 "--max-new-tokens", "4")
    assert g.returncode == 0
    merged = tmp_path / "merged"
    modulora("merge", "--model", run / "base", "--adapter", run / "adapter", "--out", merged)
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(merged)
    assert type(dense).__name__ == "LlamaForCausalLM"
    e2 = modulora("eval", "--model", merged, "--data", data, "--json")
    assert json.loads(e2.stdout)["loss"] == pytest.approx(after, rel=1e-3)


def test_targets_apart_from_lora_targets_with_dora(tiny, data, tmp_path):
    out = tmp_path / "out"
    modulora("finetune", "--model", tiny, "--quantizer", "rtn-4bit", "--data", data, "--out", out,
             "--max-steps", "2", "--batch-size", "4", "--eval-size", "4", "--lr", "5e-3",
             "--targets", "q_proj,k_proj,v_proj,o_proj", "--skip", "k_proj", "--lora-targets", "q_proj,v_proj",
             "--dora", "--rslora", "-r", "4")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA" and adapter["use_dora"] and adapter["use_rslora"] and adapter["r"] == 4
    assert sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    quantized = json.loads((out / "base" / "config.json").read_text())["quantization_config"]["modules"]
    assert sorted({n.rsplit(".", 1)[-1] for n in quantized}) == ["o_proj", "q_proj", "v_proj"]
    assert len(quantized) == 6  # 2 blocks; k_proj skipped, the MLP not targeted
    m = json.loads((out / "metrics.json").read_text())
    assert m["lora"].startswith("DoRA r=4") and "q_proj, v_proj" in m["lora"]
    e = modulora("eval", "--model", out / "base", "--adapter", out / "adapter", "--data", data, "--json")
    assert json.loads(e.stdout)["loss"] == pytest.approx(m["after"]["loss"], rel=1e-4)
    # merged into the packed base: q_proj and v_proj re-quantized, the rest as it was
    merged = tmp_path / "requantized"
    modulora("merge", "--model", out / "base", "--adapter", out / "adapter", "--out", merged, "--requantize")
    again = json.loads((merged / "config.json").read_text())["quantization_config"]
    assert again["preset"] == "rtn-4bit" and sorted(again["modules"]) == sorted(quantized)
    e2 = modulora("eval", "--model", merged, "--data", data, "--json")
    assert json.loads(e2.stdout)["loss"] == pytest.approx(m["after"]["loss"], rel=0.05)


def test_default_lora_targets_follow_the_quantized_linears(tiny, data, tmp_path):
    out = tmp_path / "out"
    modulora("finetune", "--model", tiny, "--quantizer", "rtn-4bit", "--data", data, "--out", out,
             "--max-steps", "1", "--eval-size", "0", "--targets", r"model\.layers\.0\..*", "--skip", "down_proj")
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # only block 0 is quantized: full names, since block 1's linears have the same leaf names
    assert sorted(adapter["target_modules"]) == sorted(
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"))


def _check_adapter_for_another_quantizer_is_refused(run: Path, tiny: Path, tmp_path: Path) -> None:
    modulora("quantize", tiny, "--quantizer", "nf4", "--out", tmp_path / "nf4")
    p = modulora("generate", "--model", tmp_path / "nf4", "--adapter", run / "adapter", "--prompt", "x", check=False)
    assert p.returncode == 2 and "error:" in p.stderr and "rtn-4bit" in p.stderr, p.stderr[-1500:]


@pytest.mark.parametrize("kind", ["missing", "malformed", "task", "unwritable"])
def test_bad_input(kind, tiny, data, tmp_path):
    args = ["finetune", "--model", tiny, "--quantizer", "rtn-4bit", "--out", tmp_path / "o"]
    if kind == "missing":
        args += ["--data", tmp_path / "none.jsonl"]
        want = "does not exist"
    elif kind == "malformed":
        bad = tmp_path / "bad.jsonl"
        bad.write_text(data.read_text() + '{"prompt": "x", "completion": \n')
        args += ["--data", bad]
        want = f"line {len(data.read_text().splitlines()) + 1}"
    elif kind == "task":
        args += ["--task", "samsum"]
        want = "unknown task 'samsum'"
    else:
        (tmp_path / "file").write_text("")
        args[-1] = tmp_path / "file" / "sub"
        want = "not writable"
    # in-process (the same command object the console script runs): these fail before any model loads
    from typer.testing import CliRunner

    from modulora.cli import _register, app

    _register()
    r = CliRunner().invoke(app, list(map(str, args)))
    assert r.exit_code == 2 and want in " ".join(r.output.split()), r.output[-1500:]


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny, data, tmp_path):
    out = tmp_path / "out"
    # the Trainer logs a loss line per step once training runs
    code, err = interrupt_modulora("finetune", "--model", tiny, "--quantizer", "rtn-4bit", "--data", data, "--out",
                                   out, "--max-steps", "100000", "--batch-size", "2", "--eval-size", "0",
                                   "--logging-steps", "1", when="'loss'", timeout=120)
    assert code == 130, err[-2000:]
    assert "interrupted at step" in err and "--resume" in err
    cks = sorted((out / "checkpoints").glob("checkpoint-*"))
    assert len(cks) == 1 and (cks[0] / "trainer_state.json").is_file()
    step = int(cks[0].name.split("-")[1])
    r = modulora("finetune", "--out", out, "--resume", "--max-steps", str(step + 1))
    assert f"checkpoint-{step}" in r.stderr
    assert json.loads((out / "metrics.json").read_text())["steps"] == step + 1
