"""modulora_plugin_optq: GPTQ math, GPTQ v1 packing, and checkpoint interop with GPTQModel and transformers.

The interop tests run GPTQModel in one subprocess (this file as a script, below): it quantizes a tiny Llama
itself, and loads those checkpoints and ours through transformers (optimum + gptqmodel), recording logits
and the fp16 weights its kernels dequantize. They are skipped with a reason when those are not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import modulora
from modulora import ModuLoRAConfig
from modulora_core import CheckpointError, QuantizedLinear
from modulora_core.peft_lora import QuantizedLoraLinear
from modulora_core.testing import QuantizerConformance
from modulora_core.testing.weights import gaussian_weight
from modulora_plugin_optq import OPTQConfig, OPTQQuantizer
from modulora_plugin_optq.gptq_format import load_gptq

sys.path.insert(0, str(Path(__file__).parent))  # pytest imports test files by path (importlib mode)
from test_plugin_optq_math import dense, rtn  # noqa: E402  the helpers of the math tests

Q = OPTQQuantizer()
HAVE_GPTQ = all(importlib.util.find_spec(m) for m in ("gptqmodel", "optimum"))
NEEDS_GPTQ = pytest.mark.skipif(not HAVE_GPTQ, reason="GPTQModel and optimum are not installed "
                                "(pip install 'modulora[gptq]' optimum)")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


class TestActOrderAsym3bit(QuantizerConformance):
    preset = OPTQConfig(bits=3, group_size=32, sym=False, desc_act=True)  # non-monotonic g_idx


class TestStaticWholeRow8bit(QuantizerConformance):
    preset = OPTQConfig(bits=8, group_size=-1, desc_act=True, static_groups=True)


# -- checkpoints ---------------------------------------------------------------------------------------------
def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def byte_tokenizer():
    """A one-token-per-byte tokenizer (ids 0..255), built offline."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({chr(i): i for i in range(256)}, unk_token=chr(0)))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token=chr(0), pad_token=chr(0))


CALIB = torch.randint(0, 256, (16, 64), generator=torch.Generator().manual_seed(0))
IDS = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ours(tmp_path_factory):
    """A tiny Llama quantized here with optq 4-bit, group 32, act-order, saved as GPTQ; and its dense dir."""
    root = tmp_path_factory.mktemp("optq")
    tiny_llama().save_pretrained(root / "dense")
    byte_tokenizer().save_pretrained(root / "dense")  # GPTQModel loads the model's tokenizer
    peft_model = modulora.load(root / "dense", OPTQConfig(bits=4, group_size=32, desc_act=True), calibration=CALIB)
    assert isinstance(peft_model, PeftModel)
    modulora.save_quantized(peft_model, root / "gptq", format="gptq")  # the adapters are left out
    # and at the defaults: group-aware order, which must leave an ordinary act-order-off checkpoint
    gar = modulora.load(root / "dense", OPTQConfig(bits=3, group_size=32), calibration=CALIB, lora=None)
    modulora.save_quantized(gar, root / "gptq_gar", format="gptq")
    return root, peft_model.unload()


def test_group_aware_checkpoint_is_plain_gptq_and_reads_back(ours):
    root, _ = ours
    qc = json.loads((root / "gptq_gar" / "config.json").read_text())["quantization_config"]
    assert (qc["desc_act"], qc["meta"]["act_group_aware"]) == (False, True)
    back = modulora.load(root / "gptq_gar", lora=None)
    assert back.config.quantization_config.preset == "optq"
    files = load_file(root / "gptq_gar" / "model.safetensors")
    layers = dict(modulora.iter_quantized_layers(back))
    assert len(layers) == 14
    for name, m in layers.items():
        assert torch.equal(files[f"{name}.g_idx"], (torch.arange(m.in_features) // 32).int()), name
        for k, t in m.packed.tensors.items():
            assert torch.equal(t, files[f"{name}.{k}"]), f"{name}.{k}"


def test_saved_gptq_checkpoint_is_read_back_bit_for_bit(ours, tmp_path):
    root, model = ours
    qc = json.loads((root / "gptq" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["bits"], qc["group_size"], qc["desc_act"], qc["sym"]) == ("gptq", 4, 32, True, True)
    assert json.loads((root / "gptq" / "quantize_config.json").read_text()) == qc
    files = load_file(root / "gptq" / "model.safetensors")
    assert not [k for k in files if "lora_" in k or ".packed_" in k]
    assert "lm_head.weight" not in files  # tied: saved once, as the input embedding
    back = modulora.load(root / "gptq", lora=None)  # claimed by the optq plugin: no quantizer name, no re-quantizing
    assert not isinstance(back, PeftModel) and not any(p.requires_grad for p in back.parameters())
    assert isinstance(back.config.quantization_config, ModuLoRAConfig)
    assert (back.config.quantization_config.family, back.config.quantization_config.preset) == ("optq", "optq")
    assert back.lm_head.weight is back.model.embed_tokens.weight
    layers = dict(modulora.iter_quantized_layers(model))
    assert layers.keys() == dict(modulora.iter_quantized_layers(back)).keys() and len(layers) == 14
    for name, m in layers.items():
        b = back.get_submodule(name)
        assert b.preset == "optq" and b.plugin_version == m.plugin_version
        for k, t in m.packed.tensors.items():
            assert torch.equal(b.packed.tensors[k], t), f"{name}.{k}"
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)
    # from here on it is a ModuLoRA model: save_pretrained writes our format, from_pretrained reads it packed
    back.save_pretrained(tmp_path / "native")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "native")
    assert len(list(modulora.iter_quantized_layers(again))) == 14
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    # modulora.load(path) attaches PEFT LoRA (r=8 on every quantized module), which trains
    peft_model = modulora.load(root / "gptq", chunk_rows=16)
    assert isinstance(peft_model, PeftModel)
    trainable = modulora.lora_parameters(peft_model)
    assert len(trainable) == 28 and all("lora_" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert {m.chunk_rows for _, m in modulora.iter_quantized_layers(peft_model)} == {16}
    torch.testing.assert_close(logits(peft_model), logits(model), rtol=0, atol=0)  # lora_B = 0
    peft_model.train()
    loss = peft_model(IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None for p in trainable)


def test_quantized_lm_head_and_a_bias_round_trip_through_gptq(tmp_path):
    dense = tiny_llama()
    dense.model.layers[0].self_attn.q_proj.bias = nn.Parameter(torch.randn(128) * 0.1)
    hessians = {n: torch.eye(m.in_features) for n, m in dense.named_modules()  # block calibration skips lm_head
                if isinstance(m, nn.Linear) and (n.endswith("_proj") or n == "lm_head")}
    pm = modulora.load(dense, "optq-4bit", calibration=hessians, targets=list(hessians))  # LoRA on all 15
    assert isinstance(pm.get_base_model().lm_head, QuantizedLoraLinear)
    modulora.save_quantized(pm, tmp_path, format="gptq")
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["quantization_config"]["lm_head"] is True and conf["tie_word_embeddings"] is False
    back = modulora.load(tmp_path, lora=None)
    assert isinstance(back.lm_head, QuantizedLinear) and back.lm_head.preset == "optq-4bit"
    q = back.model.layers[0].self_attn.q_proj
    assert torch.equal(q.bias, dense.model.layers[0].self_attn.q_proj.get_base_layer().bias)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(back), logits(pm), rtol=0, atol=0)
    pm.merge_adapter()
    with pytest.raises(CheckpointError, match="merged adapters"):
        modulora.save_quantized(pm, tmp_path / "merged", format="gptq")


def test_quantize_config_json_alone_and_v2_zeros_are_read(ours, tmp_path):
    import shutil

    from safetensors.torch import save_file

    from modulora_plugin_optq.packing import pack_cols, zeros_v1_to_v2

    root, model = ours
    d = shutil.copytree(root / "gptq", tmp_path / "v2")
    conf = json.loads((d / "config.json").read_text())
    del conf["quantization_config"]  # as older AutoGPTQ checkpoints: quantize_config.json only
    (d / "config.json").write_text(json.dumps(conf))
    qc = json.loads((d / "quantize_config.json").read_text())
    qc["checkpoint_format"] = "gptq_v2"  # the zero points themselves, not zero - 1
    (d / "quantize_config.json").write_text(json.dumps(qc))
    t = load_file(d / "model.safetensors")
    for k in [k for k in t if k.endswith(".qzeros")]:
        n_out = t[k[: -len("qzeros")] + "scales"].shape[1]
        t[k] = pack_cols(zeros_v1_to_v2(t[k], 4, n_out), 4)
    save_file(t, d / "model.safetensors")
    back = modulora.load(d, lora=None)
    for name, m in modulora.iter_quantized_layers(model):
        assert torch.equal(back.get_submodule(name).packed.tensors["qzeros"], m.packed.tensors["qzeros"])


def test_gptq_format_needs_optq_layers(ours, tmp_path):
    rtn = modulora.load(tiny_llama(), "rtn-4bit")  # a PeftModel: save_quantized looks through it
    with pytest.raises(CheckpointError, match="whose plugin writes no other format"):
        modulora.save_quantized(rtn, tmp_path, format="gptq")
    with pytest.raises(CheckpointError, match=r"writes \['gptq'\]"):
        modulora.save_quantized(ours[1], tmp_path, format="awq")


def test_interrupted_gptq_save_leaves_the_previous_checkpoint(ours, tmp_path, monkeypatch):
    import shutil

    import safetensors.torch

    root, model = ours
    d = shutil.copytree(root / "gptq", tmp_path / "ck")
    before = {p.name: p.read_bytes() for p in d.iterdir()}

    def broken_writer(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_writer)
    with pytest.raises(OSError, match="disk full"):
        modulora.save_quantized(model, d, format="gptq")
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # no staging folder left either


def test_broken_gptq_checkpoints_are_clear_errors(ours, tmp_path):
    root, _ = ours
    import shutil

    bad = tmp_path / "fmt"
    shutil.copytree(root / "gptq", bad)
    conf = json.loads((bad / "config.json").read_text())
    conf["quantization_config"]["checkpoint_format"] = "marlin"
    (bad / "config.json").write_text(json.dumps(conf))
    with pytest.raises(CheckpointError, match="checkpoint_format 'marlin'"):
        modulora.load(bad)
    shape = tmp_path / "shape"
    shutil.copytree(root / "gptq", shape)
    t = load_file(shape / "model.safetensors")
    t["model.layers.0.mlp.up_proj.qweight"] = t["model.layers.0.mlp.up_proj.qweight"][:-1].contiguous()
    from safetensors.torch import save_file

    save_file(t, shape / "model.safetensors")
    with pytest.raises(CheckpointError, match="qweight"):
        modulora.load(shape)


# -- interop with GPTQModel and transformers (one subprocess) ---------------------------------------------------
JOBS = {"g4": dict(bits=4, group_size=32), "g3": dict(bits=3, group_size=32, sym=False, desc_act=True),
        # GPTQModel at its defaults (dampening, group-aware order): still an act-order-off checkpoint
        "gdef": dict(bits=3, group_size=32, damp_percent=None, act_group_aware=None)}


@pytest.fixture(scope="module")
def reference(ours):
    """GPTQModel's checkpoints of the same tiny Llama, and what transformers computes from those and ours."""
    root, _ = ours
    torch.save(CALIB, root / "calib.pt")
    torch.save(IDS, root / "ids.pt")
    proc = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, torch.load(root / "reference.pt")


@NEEDS_GPTQ
@pytest.mark.parametrize("job", sorted(JOBS))
def test_gptqmodel_checkpoint_loads_as_written_and_as_it_dequantizes(reference, job):
    root, ref = reference
    model = load_gptq(root / job, dtype=torch.float32)  # GPTQModel saves float16; the packed tensors stay as saved
    files = load_file(root / job / "model.safetensors")
    layers = dict(modulora.iter_quantized_layers(model))
    assert len(layers) == 14
    for name, m in layers.items():
        for k, t in m.packed.tensors.items():
            assert torch.equal(t, files[f"{name}.{k}"]), f"{name}.{k} is not the file's tensor"
        # transformers + GPTQModel dequantize in float16: ours, asked for float16, is the same to the bit
        torch.testing.assert_close(m.dequantize(torch.float16), ref[job]["weights"][name], rtol=0, atol=0)
    if job == "g3":
        assert any(bool((m.packed.tensors["g_idx"].diff() < 0).any()) for m in layers.values())
    if job == "gdef":
        assert all(torch.equal(m.packed.tensors["g_idx"], torch.arange(m.in_features, dtype=torch.int32) // 32)
                   for m in layers.values())
    out = logits(model)
    # float32 here, float16-rounded weights there: the weights above are the exact check
    torch.testing.assert_close(out, ref[job]["logits"], rtol=0, atol=1e-2 * float(out.abs().max()))


@NEEDS_GPTQ
def test_transformers_loads_our_gptq_checkpoint_with_the_same_weights_and_logits(reference, ours):
    root, ref = reference
    _, model = ours
    for name, m in modulora.iter_quantized_layers(model):
        torch.testing.assert_close(m.dequantize(torch.float16), ref["gptq"]["weights"][name], rtol=0, atol=0)
    out = logits(model)
    torch.testing.assert_close(out, ref["gptq"]["logits"], rtol=0, atol=1e-2 * float(out.abs().max()))


@NEEDS_GPTQ
def test_transformers_loads_our_group_aware_checkpoint_with_the_same_weights(reference):
    root, ref = reference
    back = modulora.load(root / "gptq_gar", lora=None)
    for name, m in modulora.iter_quantized_layers(back):
        torch.testing.assert_close(m.dequantize(torch.float16), ref["gptq_gar"]["weights"][name], rtol=0, atol=0)


# the solver alone, pipeline taken out: GPTQModel's GPTQ class and ours on the very same weight and Hessian
SOLVER_CASES = [(bits, order) for bits in (2, 3, 4) for order in ("plain", "act", "gar")]
ORDERS = {"plain": {}, "act": {"desc_act": True}, "gar": {"act_group_aware": True}}  # each order's settings


def solver_case(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight and an ill-conditioned Hessian like real activations' (singular values over three decades,
    a few outlier channels): there a wrong dampening moves the error by 5-60% and static groups by 2-10%,
    where the mild ``synthetic_hessian`` hides both below 1%."""
    g = torch.Generator().manual_seed(seed)
    n = 512
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    x = torch.randn(2 * n, n, generator=g, dtype=torch.float64) @ torch.diag(torch.logspace(0, -3, n,
                                                                                           dtype=torch.float64)) @ u.T
    x[:, torch.randperm(n, generator=g)[:4]] *= 20  # (2n, n): a few outlier channels
    return gaussian_weight((128, n), seed), (x.T @ x / (2 * n)).float()


@NEEDS_GPTQ
@pytest.mark.parametrize(("bits", "order"), SOLVER_CASES)
def test_solver_matches_gptqmodels_on_the_same_hessian(reference, bits, order):
    # measured: the two agree within 0.4% here, and on SmolLM2's real Hessians within 0.1% in total over 28
    # layers (benchmarks/bench_optq_solver.py); a real difference in the algorithm shows up as several percent
    _, ref = reference
    ours_err = theirs_err = 0.0
    for seed in (0, 1):
        w, h = solver_case(seed)

        def out_err(q: torch.Tensor, w=w, h=h) -> float:
            e = (w - q).double()
            return float(torch.trace(e @ h.double() @ e.T))

        cfg = OPTQConfig(bits=bits, group_size=128, damp_percent=0.01, mse=0,  # GPTQModelJob's settings
                         **{"act_group_aware": False, **ORDERS[order]})
        ours_err += out_err(dense(cfg, w, h))
        theirs_err += out_err(ref["solver"][(bits, order, seed)])
    assert abs(ours_err / theirs_err - 1) < 0.01, (ours_err, theirs_err)


# -- the real model ------------------------------------------------------------------------------------------
def test_smollm2_block_0_beats_round_to_nearest_on_real_activations(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modulora.finetune.data import docstring_splits
    from modulora_core.calibrate import quantize_blockwise
    from modulora_core.calibration_data import Calibration, calibration_tokens

    d = smollm2
    tok = AutoTokenizer.from_pretrained(d)
    text = "\n\n".join(x.doc for x in docstring_splits()["train"][:60])
    cal = Calibration([text], n_samples=8, seq_len=128, tokenizer=tok, progress=False)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    names = [f"model.layers.0.{p}" for p in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                             "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
    hessians: dict[str, torch.Tensor] = {}
    quantize_blockwise(model, names, calibration_tokens(cal), lambda n, h: hessians.__setitem__(n, h), cal)
    for n in names:  # the layer output error on the calibration activations, GPTQ against RTN
        w, h = model.get_submodule(n).weight.detach(), hessians[n].double()

        def out_err(q: torch.Tensor, w=w, h=h) -> float:
            e = (w - q).double()
            return float(torch.trace(e @ h @ e.T))

        assert out_err(dense(OPTQConfig(bits=4), w, hessians[n])) < 0.5 * out_err(rtn(w, 4, 128)), n
    # what the defaults add to plain GPTQ, on the same real layers: group-aware order, then the clipping search
    total = {}
    for name, kw in {"plain": dict(act_group_aware=False, mse=0), "gar": dict(act_group_aware=True, mse=0),
                     "gar+clip": dict(act_group_aware=True, mse=2.4)}.items():
        total[name] = sum(float(torch.trace((w - (q := dense(OPTQConfig(bits=3, **kw), w, h))).double() @ h.double()
                                            @ (w - q).double().T))
                          for w, h in ((model.get_submodule(n).weight.detach(), hessians[n]) for n in names))
    assert total["gar"] < total["plain"] and total["gar+clip"] < total["gar"], total
    q = modulora.load(model, "optq-3bit", calibration=cal, targets=names, lora=None)
    assert sorted(n for n, _ in modulora.iter_quantized_layers(q)) == sorted(names)


# -- the subprocess: GPTQModel + transformers ------------------------------------------------------------------
def _reference_main(root: Path) -> None:
    from modulora_plugin_optq.gptqmodel_ref import GPTQModelJob, gptqmodel_layer, patch_cpu_count, run_jobs

    patch_cpu_count()  # GPTQModel refuses fewer than 4 CPUs
    torch.set_num_threads(1)
    jobs = [GPTQModelJob(str(root / name), **kw) for name, kw in JOBS.items()]
    run_jobs(root / "dense", torch.load(root / "calib.pt"), jobs, batch_size=4)
    from transformers import AutoModelForCausalLM

    ids = torch.load(root / "ids.pt")
    out = {}
    for name in [*JOBS, "gptq", "gptq_gar"]:
        m = AutoModelForCausalLM.from_pretrained(root / name, dtype=torch.float32, device_map="cpu").eval()
        weights = {n: mod.dequantize_weight().T.contiguous() for n, mod in m.named_modules()
                   if hasattr(mod, "dequantize_weight") and hasattr(mod, "qweight")}
        with torch.no_grad():
            out[name] = {"logits": m(ids).logits, "weights": weights}
    out["solver"] = {(bits, order, seed): gptqmodel_layer(*solver_case(seed), GPTQModelJob("", bits=bits, **ORDERS[order]))
                     for bits, order in SOLVER_CASES for seed in (0, 1)}
    torch.save(out, root / "reference.pt")


if __name__ == "__main__":
    _reference_main(Path(sys.argv[1]))
