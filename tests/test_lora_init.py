"""Quantization-aware LoRA initialization (``modulora_core.lora_init``): the residual factors are the best
low-rank fit, the initialized model is closer to the dense one than PEFT's own init for every first-party
preset, alternation and DoRA work, and the adapter is a stock PEFT adapter."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, PeftModel

import modulora
from modulora import LoraInit
from modulora_core.errors import ModuLoRAError
from modulora_core.lora_init import low_rank_residual
from tests.test_adapters import BLOCK_LINEARS, logits, tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread

# every first-party preset by its own name (family aliases such as "rtn" and "quipsharp-2bit" repeat these)
PRESETS = ["rtn-2bit", "rtn-3bit", "rtn-4bit", "rtn-8bit", "nf4", "nf4-nodq", "fp4", "fp4-nodq", "hqq-1bit",
           "hqq-2bit", "hqq-3bit", "hqq-4bit", "hqq-8bit", "optq-2bit", "optq-3bit", "optq-4bit", "optq-8bit",
           "quip#-2bit", "quip#-3bit", "quip#-4bit"]


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 128, (4, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def calibration() -> torch.Tensor:
    return torch.randint(0, 128, (16, 32), generator=torch.Generator().manual_seed(2))  # [n, t] token ids


def lora(r: int = 4, **kw) -> LoraConfig:
    return LoraConfig(**{"r": r, "lora_alpha": 8, "target_modules": BLOCK_LINEARS, "task_type": "CAUSAL_LM", **kw})


def quantized(preset: str, calibration: torch.Tensor, **kw) -> PeftModel:
    torch.manual_seed(0)  # the same LoRA A for every model; B is zero under PEFT's own init
    cal = calibration if preset.startswith(("optq", "quip")) else None
    return modulora.load(tiny_llama(), preset, calibration=cal, **{"lora": lora(), **kw}).eval()


def dist(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm())


def test_residual_factors_are_the_best_low_rank_fits() -> None:
    g = torch.Generator().manual_seed(0)
    R, X = torch.randn(48, 32, generator=g), torch.randn(256, 32, generator=g) * torch.linspace(0.1, 3, 32)
    B, A = low_rank_residual(R, 4)
    assert B.shape == (48, 4) and A.shape == (4, 32)
    S = torch.linalg.svdvals(R.double())
    assert dist(R, B @ A) == pytest.approx(float(S[4:].square().sum().sqrt()), rel=1e-5)  # Eckart–Young
    full_B, full_A = low_rank_residual(R, 40)  # above min(out, in): exact, padded with zeros
    assert full_B.shape == (48, 40) and dist(R, full_B @ full_A) < 1e-4
    H = X.T @ X
    Bh, Ah = low_rank_residual(R, 4, H, damp=0.0)
    weighted = lambda L: dist(R @ X.T, L @ X.T)  # noqa: E731 - the output error the Hessian form minimizes
    assert weighted(Bh @ Ah) < 0.97 * weighted(B @ A)  # activation-aware wins on what it optimizes ...
    assert dist(R, B @ A) < dist(R, Bh @ Ah)  # ... and plain SVD on the Frobenius norm


@pytest.mark.parametrize("preset", PRESETS)
def test_residual_init_brings_every_preset_closer_to_the_dense_model(preset, ids, calibration) -> None:
    dense = logits(tiny_llama(), ids)
    plain = logits(quantized(preset, calibration), ids)
    init = logits(quantized(preset, calibration, lora_init="residual"), ids)
    assert dist(init, dense) < dist(plain, dense), (dist(init, dense), dist(plain, dense))


def test_alternation_fits_the_weight_better(ids, calibration) -> None:
    def weight_error(model: PeftModel) -> float:
        dense, err = tiny_llama(), 0.0
        for name, layer in model.get_base_model().named_modules():
            if hasattr(layer, "lora_A") and "default" in layer.lora_A:
                w = dense.get_submodule(name).weight.detach()
                eff = layer.get_base_layer().dequantize(torch.float32) + layer.get_delta_weight("default")
                err += dist(w, eff) ** 2
        return err ** 0.5

    one = quantized("rtn-2bit", calibration, lora_init="residual")
    three = quantized("rtn-2bit", calibration, lora_init=LoraInit(rank=4, iterations=3))
    assert weight_error(three) < weight_error(one)


def test_dora_magnitudes_follow_the_initialized_adapter(ids, calibration) -> None:
    dense = logits(tiny_llama(), ids)
    plain = logits(quantized("rtn-2bit", calibration, lora=lora(use_dora=True)), ids)
    init = logits(quantized("rtn-2bit", calibration, lora=lora(use_dora=True), lora_init="residual"), ids)
    assert dist(init, dense) < dist(plain, dense)


def test_adapter_saves_and_loads_as_stock_peft(ids, calibration, tmp_path) -> None:
    model = quantized("optq-3bit", calibration, lora_init="residual")
    model.save_pretrained(tmp_path / "adapter")
    base = modulora.load(tiny_llama(), "optq-3bit", calibration=calibration, lora=None)  # same packed weights
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert torch.equal(logits(reloaded, ids), logits(model, ids))


def test_init_from_residual_after_quantizing_matches_the_load_option(ids, calibration) -> None:
    at_load = quantized("nf4", calibration, lora_init="residual")
    later = quantized("nf4", calibration)
    assert modulora.init_lora_from_residual(later, tiny_llama())
    assert torch.allclose(logits(later, ids), logits(at_load, ids), atol=1e-5)


def test_misuse_is_refused(calibration, tmp_path) -> None:
    with pytest.raises(ValueError, match="needs adapters"):
        modulora.load(tiny_llama(), "rtn-4bit", lora=None, lora_init="residual")
    with pytest.raises(ValueError, match="lora_init must be one of"):
        modulora.load(tiny_llama(), "rtn-4bit", lora_init="loftq")
    with pytest.raises(modulora.AdapterError, match="rank 4"):
        modulora.load(tiny_llama(), "rtn-4bit", lora=lora(r=8), lora_init=LoraInit(rank=4))
    saved = modulora.load(tiny_llama(), "rtn-4bit", lora=None)
    saved.save_pretrained(tmp_path / "base")
    with pytest.raises(ModuLoRAError, match="init_lora_from_residual"):
        modulora.load(tmp_path / "base", lora_init="residual")


def test_finetune_command_takes_lora_init_residual(tmp_path) -> None:
    import json

    from modulora.finetune.tiny import run_modulora, tiny_llama_dir

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Repeat {w}", "completion": f"{w} {w}"}) + "\n"
                            for w in "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()))
    out, model = tmp_path / "out", tiny_llama_dir(tmp_path / "tiny")
    p = run_modulora("finetune", "--model", model, "--quantizer", "rtn-2bit", "--data", data, "--out", out,
                     "--max-steps", "1", "--eval-size", "2", "--lora-init", "residual", "-r", "4",
                     "--lora-init-iterations", "2")
    assert "LoRA initialized from the quantization residual on 14 linears after 2 rounds of alternation" in (
        p.stdout + p.stderr)
    assert json.loads((out / "run_config.json").read_text())["lora_init_iterations"] == 2
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    bad = run_modulora("finetune", "--model", out / "base", "--data", data, "--out", tmp_path / "o2",
                       "--lora-init", "residual", check=False)
    assert bad.returncode != 0 and "needs the dense weights" in bad.stdout + bad.stderr
    alone = run_modulora("finetune", "--model", model, "--data", data, "--out", tmp_path / "o3",
                         "--lora-init-iterations", "2", check=False)
    assert alone.returncode != 0 and "add --lora-init residual" in alone.stdout + alone.stderr
    assert not (tmp_path / "o3" / "run_config.json").exists()
    unknown = run_modulora("finetune", "--model", model, "--data", data, "--out", tmp_path / "o4",
                           "--lora-init", "loftq", check=False)
    assert unknown.returncode == 2 and "--lora-init: Input should be 'default' or 'residual'" in unknown.stderr, (
        unknown.stderr[-2000:])
