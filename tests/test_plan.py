"""modulora.plan: exact packed sizes, model shapes, the activation model against counted tensors, the
components and their total, quantization targets apart from LoRA targets, bad input, and `modulora plan`."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM
from typer.testing import CliRunner

import modulora
from modulora.cli import plan as plan_cli
from modulora.planning.memtrace import PeakTracker, peak_bytes
from modulora.planning.planner import QLORA_RUNTIME_EXTRA, parse_size, plan
from modulora.planning.shapes import BUILTIN_MODELS, model_config, model_shapes, quantized_names
from modulora_core.errors import InvalidWeightError, ModuLoRAError, UnknownQuantizerError
from modulora_core.quantizer import Quantizer

MiB = 1 << 20
TINY = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 3, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512, "tie_word_embeddings": False}


def tiny_config(**kw) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **kw}, architectures=["LlamaForCausalLM"])


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


# -- exact packed sizes -------------------------------------------------------------------------------------
SHAPES = [(64, 128), (48, 192), (8, 200), (3, 72)]
CALIBRATION_FREE = ["rtn-2bit", "rtn-3bit", "rtn-4bit", "rtn-8bit", "nf4", "nf4-nodq", "fp4", "hqq-1bit",
                    "hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit"]


def _installed(name: str) -> modulora.Preset:
    if name not in modulora.available_presets():
        pytest.skip(f"{name} is not installed")
    return modulora.get_preset(name)


def _fits(bq: modulora.Preset, shape: tuple[int, int]) -> bool:
    caps = bq.capabilities()
    return shape[0] % caps.out_multiple == 0 and shape[1] % caps.in_multiple == 0


@pytest.mark.parametrize("name", CALIBRATION_FREE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_packed_nbytes_equals_real_quantize_and_pack(name: str, shape: tuple[int, int]) -> None:
    bq = _installed(name)
    if not _fits(bq, shape):
        with pytest.raises(InvalidWeightError):
            bq.quantizer.packed_nbytes(shape, bq.config)
        return
    real = bq.quantize(torch.randn(*shape)).nbytes()
    assert bq.quantizer.packed_nbytes(shape, bq.config) == real
    # the protocol's default (meta device, else a random weight) is exact too
    assert Quantizer.packed_nbytes(bq.quantizer, shape, bq.config) == real


@pytest.mark.parametrize("name", ["optq-2bit", "optq-3bit", "optq-4bit", "quip#-2bit", "quip#-4bit"])
def test_packed_nbytes_of_calibrating_quantizers(name: str) -> None:
    bq = _installed(name)
    shape = (64, 256)
    real = bq.quantize(torch.randn(*shape), torch.eye(shape[1])).nbytes()
    assert bq.quantizer.packed_nbytes(shape, bq.config) == real


def test_packed_nbytes_needs_no_memory_for_65b_shapes() -> None:
    bq = modulora.get_preset("rtn-2bit")
    n = bq.quantizer.packed_nbytes((22016, 8192), bq.config)
    assert n == 22016 * (8192 // 8 * 2 + 8192 // 64 * 3)  # codes + fp16 scale + uint8 zero per 64


# -- model shapes -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,params", [("llama-7b", 6_738_415_616), ("llama-65b", 65_285_660_672),
                                         ("smollm2-135m", 134_515_008), ("llama-2-70b", 68_976_648_192)])
def test_builtin_shapes_have_the_published_parameter_counts(name: str, params: int) -> None:
    shapes = model_shapes(model_config(name), None)
    assert shapes.n_params == params
    assert len(shapes.targets) == 7 * BUILTIN_MODELS[name]["num_hidden_layers"]


def test_tied_embeddings_counted_once_and_shapes_from_a_config_dir(tmp_path) -> None:
    tiny_config(tie_word_embeddings=True).save_pretrained(tmp_path)
    for source in (tmp_path, tmp_path / "config.json", str(tmp_path)):
        shapes = model_shapes(model_config(source), ["q_proj", "v_proj"])
        assert [t.leaf for t in shapes.targets] == ["q_proj", "v_proj"] * 3
        assert "lm_head.weight" not in shapes.dense_params  # tied to the embeddings: counted once
        # the untargeted linears stay dense
        assert shapes.dense_params["model.layers.0.mlp.down_proj.weight"] == 128 * 352


def test_builtin_smollm2_matches_the_real_config(smollm2) -> None:
    real = smollm2
    a, b = model_shapes(model_config(real), None), model_shapes(model_config("smollm2-135m"), None)
    assert a.n_params == b.n_params and a.targets == b.targets
    assert (a.num_kv_heads, a.head_dim, a.vocab_size) == (b.num_kv_heads, b.head_dim, b.vocab_size)


# -- the activation model against the tensors a real step holds ---------------------------------------------
def _measured_peak(cfg: LlamaConfig, preset: str, batch: int, seq: int, dtype: torch.dtype, lora: LoraConfig,
                   checkpointing: bool, targets: list[str] | None = None, model_class: type = LlamaForCausalLM) -> int:
    """Bytes of every tensor alive at the peak of a training step (after a warm-up step), exactly; preset
    ``"dense"``: plain PEFT LoRA on the dense model."""
    torch.manual_seed(0)
    dense = model_class(cfg).to(dtype)
    base = dense if preset == "dense" else modulora.load(dense, preset, lora=None, targets=targets)
    model = get_peft_model(base, lora)
    if checkpointing:
        model.activation_checkpointing_enable({"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    ids = torch.randint(cfg.vocab_size, (batch, seq))

    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    held = [*model.parameters(), *model.buffers(), *(s for p in params for s in opt.state[p].values())]
    with PeakTracker() as pt:
        pt.note_existing(*held)
        step()
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in held}.values()) + pt.peak


@pytest.mark.parametrize("case", [
    {"preset": "rtn-4bit", "dtype": "float32"},
    {"preset": "rtn-2bit", "dtype": "bfloat16", "dropout": 0.1},
    {"preset": "nf4", "dtype": "float32", "checkpointing": True},
    {"preset": "rtn-3bit", "dtype": "float32", "targets": ["q_proj", "v_proj"]},
    # the paper's setting: every linear quantized, LoRA on q_proj and v_proj only
    {"preset": "rtn-4bit", "dtype": "float32", "lora_targets": ["q_proj", "v_proj"]},
    # LoRA on a linear left dense (down_proj) too
    {"preset": "rtn-4bit", "dtype": "float32", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
     "lora_targets": ["v_proj", "down_proj"]},
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_prediction_within_5_percent_of_counted_tensors(case: dict) -> None:
    cfg = tiny_config()
    targets = case.get("targets")
    lora_on = case.get("lora_targets") or quantized_names(cfg, targets)
    lora = LoraConfig(r=8, lora_dropout=case.get("dropout", 0.0), target_modules=lora_on)
    ckpt = case.get("checkpointing", False)
    dtype = getattr(torch, case["dtype"])
    # 256 tokens: enough for the activations to outweigh the LoRA gradients, which the plan counts whole
    # although at the peak only the last layer's exist
    measured = _measured_peak(cfg, case["preset"], 4, 64, dtype, lora, ckpt, targets)
    p = plan(cfg, case["preset"], targets=targets, batch_size=4, seq_len=64, lora=lora, dtype=case["dtype"],
             gradient_checkpointing=ckpt, runtime_bytes=0)
    assert abs(p.total - measured) <= 0.05 * measured, (p.total, measured, str(p))


# -- quantization targets apart from LoRA targets ------------------------------------------------------------
def test_lora_targets_are_apart_from_quantization_targets() -> None:
    cfg = tiny_config()
    shapes = model_shapes(cfg, None)
    every = plan(cfg, "rtn-4bit")  # lora=None: r=8 on every quantized linear
    paper = plan(cfg, "rtn-4bit", lora=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    # the same packed base; LoRA parameters only for q_proj and v_proj
    assert paper.component("packed").nbytes == every.component("packed").nbytes
    assert paper.component("unquantized").nbytes == every.component("unquantized").nbytes
    qv = [t for t in shapes.targets if t.leaf in ("q_proj", "v_proj")]
    n_lora = 8 * sum(t.out_features + t.in_features for t in qv)
    assert paper.component("lora").nbytes == n_lora * 4 * (2 + 2)  # float32 params, grads, 2 AdamW states
    assert paper.component("activations").nbytes < every.component("activations").nbytes
    assert paper.settings["lora_modules"] == ["q_proj", "v_proj"] and paper.settings["n_quantized"] == 21
    # quantizing fewer linears: fewer packed bytes, more dense ones, and LoRA follows by default
    few = plan(cfg, "rtn-4bit", targets=["q_proj", "v_proj"])
    assert few.component("lora").nbytes == paper.component("lora").nbytes
    assert few.component("packed").nbytes < every.component("packed").nbytes
    assert few.component("unquantized").nbytes > every.component("unquantized").nbytes
    skip = plan(cfg, "rtn-4bit", modules_to_not_convert=["down_proj"])
    assert skip.settings["quantized_modules"] == ["gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    # LoRA on linears that stay dense counts their adapters, not their (dense) weights twice
    dense_lora = plan(cfg, "rtn-4bit", targets=["q_proj"], lora=LoraConfig(target_modules=["q_proj", "down_proj"]))
    assert dense_lora.settings["n_lora"] == 6 and dense_lora.component("unquantized").nbytes == \
        few.component("unquantized").nbytes + sum(4 * t.out_features * t.in_features for t in qv if t.leaf == "v_proj")


def test_a_lora_config_without_target_modules_means_peft_default() -> None:
    cfg = tiny_config()
    p = plan(cfg, "rtn-4bit", lora=LoraConfig(r=4))  # PEFT: q_proj and v_proj for a Llama
    assert p.settings["lora_modules"] == ["q_proj", "v_proj"] and p.settings["lora_r"] == 4
    dora = plan(cfg, "rtn-4bit", lora=LoraConfig(r=4, use_dora=True))
    extra = sum(t.out_features for t in model_shapes(cfg, ["q_proj", "v_proj"]).targets)  # magnitudes
    assert dora.component("lora").nbytes - p.component("lora").nbytes == extra * 4 * 4
    assert any("DoRA" in n for n in dora.notes)


# -- components and totals ----------------------------------------------------------------------------------
def test_components_sum_to_the_total_and_one_transient_counts() -> None:
    for kw in ({}, {"gradient_checkpointing": True}, {"chunk_rows": 64}, {"batch_size": 8, "seq_len": 512}):
        p = plan(tiny_config(), "rtn-4bit", **kw)
        assert p.total == sum(c.nbytes for c in p.components if c.counted)
        assert sum(p.component(k).counted for k in ("loss", "layer_backward")) == 1
        assert all(c.nbytes >= 0 for c in p.components)
        d = p.to_dict()
        assert d["total_bytes"] == p.total and len(d["components"]) == 7
        json.dumps(d)


def test_packed_component_is_the_sum_of_exact_sizes_and_dense_has_no_packing() -> None:
    cfg = tiny_config()
    shapes = model_shapes(cfg, None)
    bq = modulora.get_preset("rtn-3bit")
    expected = sum(bq.quantize(torch.randn(t.out_features, t.in_features)).nbytes() for t in shapes.targets)
    assert plan(cfg, "rtn-3bit").component("packed").nbytes == expected
    dense = plan(cfg, "dense", dtype="bfloat16")
    assert dense.component("packed").nbytes == sum(2 * t.out_features * t.in_features for t in shapes.targets)


def test_plan_is_public() -> None:
    assert modulora.plan is plan and "plan" in modulora.__all__ and "MemoryPlan" in modulora.__all__


def test_qlora_is_nf4_storage_with_peft_runtime() -> None:
    cfg = tiny_config()
    nf4, qlora, dense = plan(cfg, "nf4"), plan(cfg, "qlora"), plan(cfg, "dense")
    assert qlora.quantizer.startswith("qlora") and "bitsandbytes nf4" in qlora.quantizer
    for key in ("packed", "unquantized", "lora", "activations", "layer_backward"):
        assert qlora.component(key).nbytes == nf4.component(key).nbytes
    # the process holds bitsandbytes' library besides ours, but not the backends dense PEFT imports
    assert nf4.component("runtime").nbytes < qlora.component("runtime").nbytes < dense.component("runtime").nbytes
    assert qlora.component("runtime").nbytes == nf4.component("runtime").nbytes + QLORA_RUNTIME_EXTRA["cpu"]
    assert plan(cfg, "qlora", device="cuda").component("runtime").nbytes == \
        plan(cfg, "nf4", device="cuda").component("runtime").nbytes


def test_per_module_quantizers_and_chunking_and_checkpointing_shrink_what_they_should() -> None:
    cfg = tiny_config()
    mixed = plan(cfg, {"down_proj": "rtn-4bit", "*": "rtn-2bit"}).component("packed").nbytes
    two, four = plan(cfg, "rtn-2bit").component("packed").nbytes, plan(cfg, "rtn-4bit").component("packed").nbytes
    assert two < mixed < four
    big = {"batch_size": 4, "seq_len": 256}
    assert plan(cfg, "rtn-4bit", gradient_checkpointing=True, **big).component("activations").nbytes < \
        plan(cfg, "rtn-4bit", **big).component("activations").nbytes
    whole = plan("llama-7b", "rtn-4bit", seq_len=16).component("layer_backward").nbytes
    tiled = plan("llama-7b", "rtn-4bit", seq_len=16, chunk_rows=256).component("layer_backward").nbytes
    assert tiled < whole / 4


def test_budget_verdict() -> None:
    assert plan(tiny_config(), "rtn-4bit", budget="1TB").fits is True
    p = plan(tiny_config(), "rtn-4bit", budget="1MiB")
    assert p.fits is False and p.budget == MiB
    assert plan(tiny_config(), "rtn-4bit").fits is None


@pytest.mark.parametrize("text,value", [("24GB", 24 * 10**9), ("24GiB", 24 << 30), ("1.5 gib", 3 << 29),
                                        ("512MiB", 512 << 20), (" 100 ", 100), (2048, 2048)])
def test_parse_size(text, value) -> None:
    assert parse_size(text) == value


# -- bad input ----------------------------------------------------------------------------------------------
def test_bad_inputs_give_clear_errors() -> None:
    with pytest.raises(ModuLoRAError, match=r"unknown model 'llama-8b'.*llama-7b"):
        plan("llama-8b")
    with pytest.raises(UnknownQuantizerError, match="unknown quantizer 'rtn-5bit'"):
        plan(tiny_config(), "rtn-5bit")
    with pytest.raises(ModuLoRAError, match="cannot read the memory size '24 parsecs'.*GiB"):
        plan(tiny_config(), budget="24 parsecs")
    with pytest.raises(ModuLoRAError, match="batch_size must be a positive int"):
        plan(tiny_config(), batch_size=0)
    with pytest.raises(ModuLoRAError, match="unknown optimizer 'lion'"):
        plan(tiny_config(), optimizer="lion")
    with pytest.raises(ModuLoRAError, match="no quantizer for module .*catch-all"):
        plan(tiny_config(), {"down_proj": "rtn-4bit"})
    with pytest.raises(ModuLoRAError, match="no nn.Linear .*matches targets=\\['qq_proj'\\]"):
        plan(tiny_config(), lora=LoraConfig(target_modules=["qq_proj"]))
    with pytest.raises(ModuLoRAError, match="unknown dtype 'float8'"):
        plan(tiny_config(), dtype="float8")
    with pytest.raises(ModuLoRAError, match="a memory size must be positive"):
        parse_size("0GB")


# -- the memory tracker -------------------------------------------------------------------------------------
def test_peak_tracker_counts_storages_once_and_frees() -> None:
    def work() -> torch.Tensor:
        a = torch.ones(1024, 256)  # 1 MiB
        b = a.view(256, 1024).t()  # a view: free
        c = b.contiguous()  # a copy: 1 MiB more
        del a, b
        return c.add_(1)  # in place: free

    peak, out = peak_bytes(work)
    assert peak == 2 * MiB and out.shape == (1024, 256)


# -- the command --------------------------------------------------------------------------------------------
def _app() -> typer.Typer:
    app = typer.Typer()
    plan_cli.register(app)
    app.command("noop")(lambda: None)  # with one command typer would drop the command name
    return app


def test_cli_json_and_exit_status(tmp_path) -> None:
    tiny_config().save_pretrained(tmp_path)
    runner = CliRunner()
    res = runner.invoke(_app(), ["plan", str(tmp_path), "-q", "rtn-2bit", "--module", "down_proj=rtn-4bit",
                                 "--budget", "100GB", "--json"])
    assert res.exit_code == 0, res.output
    d = json.loads(res.output)
    assert d["fits"] is True and d["quantizer"] == "rtn-2bit, rtn-4bit"
    res = runner.invoke(_app(), ["plan", str(tmp_path), "--budget", "1MiB"], env={"COLUMNS": "200"})
    assert res.exit_code == 1 and "does not fit" in res.output and "total (peak)" in res.output
    res = runner.invoke(_app(), ["plan", "llama-8b"])
    assert res.exit_code == 2 and "unknown model 'llama-8b'" in res.output
    res = runner.invoke(_app(), ["plan", str(tmp_path), "--budget", "24 parsecs"])
    assert res.exit_code == 2 and "cannot read the memory size" in res.output


def test_cli_targets_apart_from_lora_targets(tmp_path) -> None:
    tiny_config().save_pretrained(tmp_path)
    runner = CliRunner()

    def run(*args: str) -> dict:
        res = runner.invoke(_app(), ["plan", str(tmp_path), "-q", "rtn-4bit", "--json", *args])
        assert res.exit_code == 0, res.output
        return json.loads(res.output)

    def nbytes(d: dict, key: str) -> int:
        return next(c["nbytes"] for c in d["components"] if c["key"] == key)

    default, paper = run(), run("--lora-targets", "q_proj,v_proj")
    assert default["settings"]["lora_modules"] == default["settings"]["quantized_modules"]
    assert paper["settings"]["lora_modules"] == ["q_proj", "v_proj"] and paper["settings"]["n_quantized"] == 21
    assert nbytes(paper, "packed") == nbytes(default, "packed") and nbytes(paper, "lora") < nbytes(default, "lora")
    # --rank without --lora-targets keeps LoRA on every quantized linear (not PEFT's per-model default)
    r16 = run("--targets", "q_proj,k_proj,v_proj", "--skip", "k_proj", "-r", "16", "--dora")
    assert r16["settings"]["quantized_modules"] == r16["settings"]["lora_modules"] == ["q_proj", "v_proj"]
    assert r16["settings"]["lora_r"] == 16 and r16["settings"]["use_dora"] is True
    regex = run("--targets", "all-linear", "--lora-targets", r"model\.layers\.0\..*_proj")
    assert regex["settings"]["n_quantized"] == 21 and regex["settings"]["n_lora"] == 7
    res = runner.invoke(_app(), ["plan", str(tmp_path), "--lora-targets", "qq_proj"])
    assert res.exit_code == 2 and "qq_proj" in res.output


# -- mixture of experts -------------------------------------------------------------------------------------
MOE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 256, "num_local_experts": 8, "num_experts_per_tok": 2,
       "tie_word_embeddings": False}
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def moe_config(**kw) -> MixtralConfig:
    return MixtralConfig(**{**MOE, **kw})


def test_moe_shapes_count_every_expert_and_routers_stay_dense() -> None:
    cfg = moe_config()
    shapes = model_shapes(cfg, None)
    with torch.device("meta"):
        real = sum(p.numel() for p in MixtralForCausalLM(cfg).parameters())
    assert shapes.n_params == real
    assert len(shapes.targets) == 3 * (4 + 2 * 8)  # attention + gate_up and down of each expert
    gate_up = [t for t in shapes.targets if t.leaf == "gate_up_proj"]
    assert {(t.out_features, t.in_features) for t in gate_up} == {(2 * 96, 64)} and len(gate_up) == 24
    assert sorted({t.expert for t in gate_up}) == list(range(8))
    assert (shapes.num_experts, shapes.experts_per_token, shapes.expert_intermediate_size) == (8, 2, 96)
    assert shapes.moe_layers == (0, 1, 2) and not shapes.shared_experts
    assert all(".mlp.gate." in n for n in shapes.dense_params if ".mlp." in n)  # the routers
    # every expert packed: the exact sizes of one expert matrix each
    bq = modulora.get_preset("rtn-2bit")
    assert plan(cfg, "rtn-2bit").component("packed").nbytes == sum(
        bq.quantizer.packed_nbytes((t.out_features, t.in_features), bq.config) for t in shapes.targets)
    # GPT-2's Conv1D ([in, out]) read the right way round
    from transformers import GPT2Config

    c_attn = next(t for t in model_shapes(GPT2Config(n_embd=64, n_layer=1, n_head=4), None).targets
                  if t.leaf == "c_attn")
    assert (c_attn.out_features, c_attn.in_features) == (3 * 64, 64)


def test_target_parameters_map_to_every_expert() -> None:
    cfg = moe_config()
    p = plan(cfg, "rtn-4bit", lora=LoraConfig(r=4, target_modules=ATTN, target_parameters=EXPERTS))
    assert p.settings["n_lora"] == 3 * (4 + 2 * 8)
    assert p.settings["lora_modules"] == ["down_proj", "gate_up_proj", "k_proj", "o_proj", "q_proj", "v_proj"]
    only_down = plan(cfg, "rtn-4bit", lora=LoraConfig(r=4, target_modules=ATTN,
                                                      target_parameters=["mlp.experts.down_proj"]))
    assert only_down.settings["n_lora"] == 3 * (4 + 8)
    assert only_down.component("activations").nbytes < p.component("activations").nbytes
    assert any("MoE: 3 layers of 8 experts" in n for n in p.notes)
    with pytest.raises(ModuLoRAError, match="names no MoE experts matrix.*mlp.experts.gate_up_proj"):
        plan(cfg, lora=LoraConfig(target_modules=ATTN, target_parameters=["mlp.experts.w9"]))


@pytest.mark.parametrize("case", [
    {"preset": "rtn-4bit", "dtype": "float32", "experts": EXPERTS},
    {"preset": "rtn-2bit", "dtype": "bfloat16", "experts": EXPERTS},
    {"preset": "rtn-4bit", "dtype": "float32", "experts": None, "attn": ["q_proj", "v_proj"]},
    {"preset": "rtn-4bit", "dtype": "float32", "experts": ["mlp.experts.down_proj"]},
    # plain PEFT LoRA on the fused experts: A@B added to the whole stack, kept for backward
    {"preset": "dense", "dtype": "float32", "experts": EXPERTS},
], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_moe_prediction_within_5_percent_of_counted_tensors(case: dict) -> None:
    cfg = moe_config()
    lora = LoraConfig(r=8, target_modules=case.get("attn", ATTN), target_parameters=case["experts"])
    measured = _measured_peak(cfg, case["preset"], 8, 64, getattr(torch, case["dtype"]), lora, False,
                              model_class=MixtralForCausalLM)
    p = plan(cfg, case["preset"], batch_size=8, seq_len=64, lora=lora, dtype=case["dtype"], runtime_bytes=0)
    assert abs(p.total - measured) <= 0.05 * measured, (p.total, measured, str(p))
