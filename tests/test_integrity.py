"""Nothing silently wrong with a saved quantized model: a hand-edited quantization config (native
config.json or the 0.1 index) is refused naming the field, NaN/inf weights are named before quantizing, and
stale staging folders of a killed save are removed at the next save or load (issue 13, items 4, 11, 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import modulora
from modulora_core.checkpoint import LEGACY_INDEX
from modulora_core.files import STAGE_PREFIX, remove_stale_stages, staged_writes

pytestmark = pytest.mark.usefixtures("one_thread")


def _test_model_module():
    """tests/test_model.py, for its tiny model and its writer of the 0.1 layout (pytest imports test files
    with importlib, so a sibling is not importable by name)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_test_model", Path(__file__).with_name("test_model.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_tm = _test_model_module()
tiny_llama, write_legacy = _tm.tiny_llama, _tm.write_legacy


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    model = modulora.load(tiny_llama(), "rtn-4bit", lora=None)
    d = tmp_path_factory.mktemp("quant")
    modulora.save_quantized(model, d)
    return d, model


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    edit(config["quantization_config"])
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_saved_config_carries_a_checksum_and_reloads(saved):
    qc = json.loads((saved[0] / "config.json").read_text())["quantization_config"]
    assert qc["checksum"].startswith("sha256:")
    again = modulora.load(saved[0], lora=None)
    ids = torch.arange(16)[None]
    torch.testing.assert_close(again(ids).logits, saved[1](ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(("field", "value"), [("bits", 2), ("symmetric", True), ("group_size", 32)])
def test_hand_edited_quantizer_config_is_named(saved, tmp_path, field, value):
    assert field in json.loads((saved[0] / "config.json").read_text())["quantization_config"]["quantizer_config"]
    d = _edited(saved[0], tmp_path / "ck", lambda qc: qc["quantizer_config"].update({field: value}))
    for load in (lambda: modulora.load(d, lora=None), lambda: AutoModelForCausalLM.from_pretrained(d)):
        with pytest.raises(modulora.CheckpointError,
                           match=rf"edited after.*quantizer_config\.{field} is {json.dumps(value)} in config\.json"):
            load()


def test_edited_module_shape_and_removed_checksum_are_refused(saved, tmp_path):
    def shape(qc):
        rec = qc["modules"]["model.layers.0.mlp.up_proj"]
        rec["extra"] = {**rec.get("extra", {}), "note": "edited"}
    d = _edited(saved[0], tmp_path / "a", shape)
    with pytest.raises(modulora.CheckpointError, match=r"modules\.model\.layers\.0\.mlp\.up_proj\.extra\.note"):
        modulora.load(d, lora=None)
    d = _edited(saved[0], tmp_path / "b", lambda qc: qc.pop("checksum"))
    with pytest.raises(modulora.CheckpointError, match="has no checksum"):
        modulora.load(d, lora=None)


def test_hand_edited_legacy_index_is_named(saved, tmp_path):
    d = write_legacy(saved[1], tmp_path / "legacy")
    index = json.loads((d / LEGACY_INDEX).read_text())
    index["modules"]["model.layers.1.self_attn.v_proj"]["config"]["bits"] = 2
    (d / LEGACY_INDEX).write_text(json.dumps(index))
    with pytest.raises(modulora.CheckpointError, match=r"v_proj\.config\.bits is 2 in modulora_quant\.json"):
        modulora.load(d, lora=None)


def test_nan_weight_is_named_before_quantizing(tmp_path):
    model = tiny_llama()
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("inf")
    with pytest.raises(modulora.InvalidWeightError, match=r"down_proj\.weight \(1 NaN/inf\), model\.norm\.weight \(1 NaN/inf\)"):
        modulora.load(model, "rtn-4bit", lora=None)
    model.save_pretrained(tmp_path / "nan")
    with pytest.raises(modulora.InvalidWeightError, match=r"model\.norm\.weight"):
        modulora.load(tmp_path / "nan", "rtn-4bit", lora=None)


def test_stale_staging_folders_of_a_killed_save_are_removed(saved, tmp_path):
    d = tmp_path / "base"
    shutil.copytree(saved[0], d)
    # a real process that dies (SIGKILL) inside a staged save leaves its staging folder behind
    code = ("import os, signal, sys; from modulora_core.files import staged_writes\n"
            "with staged_writes(sys.argv[1]) as s:\n"
            "    (s / 'config.json').write_text('{}'); os.kill(os.getpid(), signal.SIGKILL)\n")
    subprocess.run([sys.executable, "-c", code, str(d)], check=False)
    old_style = d / f"{STAGE_PREFIX}abc123"  # the name an earlier version gave a staging folder
    old_style.mkdir()
    stale = sorted(p.name for p in d.glob(f"{STAGE_PREFIX}*"))
    assert len(stale) == 2, stale
    mine = tmp_path / "mine"
    with staged_writes(mine) as live:  # one of this (living) process is left alone
        assert remove_stale_stages(mine) == [] and live.is_dir()
    modulora.load(d, lora=None)  # a load cleans up
    assert not list(d.glob(f"{STAGE_PREFIX}*"))
    subprocess.run([sys.executable, "-c", code, str(d)], check=False)
    assert len(list(d.glob(f"{STAGE_PREFIX}*"))) == 1
    modulora.save_quantized(saved[1], d)  # and so does the next save
    assert not list(d.glob(f"{STAGE_PREFIX}*"))
    assert os.listdir(d)
