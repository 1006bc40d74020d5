"""QuIP#'s end-to-end stage (modulora_plugin_quipsharp.e2e) on a real tiny Llama (tied embeddings, as
modulora.finetune.tiny builds it): the core hands it the dense model's inputs to lm_head, it lowers the
calibration KL and the held-out error against no tuning, keeps the untuned state when it cannot improve, its
tuned signs survive save/load, the residual LoRA init is refit after it, and bad settings are clear errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import modulora
from modulora.finetune.tiny import tiny_llama_dir
from modulora_core import QuantizerConfigError, get_preset
from modulora_core.calibration_data import Calibration
from modulora_core.lora_init import LoraInit
from modulora_core.surgery import QuantizeOptions, quantize_model
from modulora_plugin_quipsharp import QuipSharpConfig, QuipSharpQuantizer, e2e

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread

Q = QuipSharpQuantizer()
E2E = QuipSharpConfig(bits=2, ft_e2e_steps=24, ft_e2e_lr=3e-3, ft_e2e_batch=4)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir(tmp_path_factory.mktemp("tiny"))).eval()


def tokens(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 259, (n, 64), generator=torch.Generator().manual_seed(seed))  # byte tokens


def quantized(dense, config: QuipSharpConfig):
    return modulora.load(copy.deepcopy(dense), config, lora=None,
                         calibration=Calibration(tokens(), progress=False))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_end_to_end_tuning_lowers_the_calibration_kl_and_the_held_out_error(dense):
    calls = []
    tune = e2e.tune_model

    def spy(model, names, toks, teacher, *rest):
        calls.append((teacher, tune(model, names, toks, teacher, *rest)))
        return calls[-1][1]

    e2e.tune_model = spy
    try:
        tuned = quantized(dense, E2E)
    finally:
        e2e.tune_model = tune
    (teacher, stats), = calls
    # the teacher is what the dense model fed lm_head, captured before quantization began
    assert torch.allclose(teacher, e2e.head_inputs(dense, dense.lm_head, tokens()).detach(), atol=1e-6)
    assert stats["kept"] and stats["after"] < 0.9 * stats["before"] and stats["after"] == min(stats["history"])
    assert e2e.calibration_kl(tuned, tokens(), teacher, 4) == pytest.approx(stats["after"], rel=1e-4)
    plain = quantized(dense, E2E.model_copy(update={"ft_e2e_steps": 0}))
    held_out = tokens(8, seed=1)
    with torch.no_grad():
        ref = e2e.head_inputs(dense, dense.lm_head, held_out)
    assert e2e.calibration_kl(tuned, held_out, ref, 4) < 0.97 * e2e.calibration_kl(plain, held_out, ref, 4)
    a, b = (dict(modulora.iter_quantized_layers(m))["model.layers.1.mlp.up_proj"].packed for m in (tuned, plain))
    assert a.tensors["su"].dtype == torch.float16 and torch.equal(a.tensors["codes"], b.tensors["codes"])
    assert not torch.equal(a.tensors["sv"], b.tensors["sv"].to(torch.float16))


def test_a_model_it_cannot_improve_is_left_untouched(dense):
    model = quantized(dense, E2E.model_copy(update={"ft_e2e_steps": 0, "ft_steps": 1, "ft_lr": 1e-9}))
    names = [n for n, _ in modulora.iter_quantized_layers(model)]
    with torch.no_grad():  # the quantized model's own outputs: its KL is 0 already, tuning can only lose
        teacher = e2e.head_inputs(model, model.lm_head, tokens())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    stats = e2e.tune_model(model, names, tokens(), teacher, E2E.model_copy(update={"ft_e2e_lr": 0.1}), Q)
    assert not stats["kept"] and stats["after"] == stats["before"] < 1e-6
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_and_reload_give_identical_logits(dense, tmp_path):
    from transformers import AutoModelForCausalLM

    model = quantized(dense, E2E.model_copy(update={"ft_steps": 4}))
    modulora.save_quantized(model, tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    ids = tokens(4, seed=2)
    assert torch.equal(logits(again, ids), logits(model, ids))
    packed = dict(modulora.iter_quantized_layers(again))["model.layers.0.self_attn.o_proj"].packed
    assert packed.tensors["sv"].dtype == torch.float16 and packed.config.ft_e2e_steps == E2E.ft_e2e_steps


def test_residual_lora_init_is_refit_after_the_end_to_end_stage(dense):
    init = LoraInit(rank=64, activation_aware=False)  # full rank: B0 A0 is the whole residual
    model = copy.deepcopy(dense)
    cfg = E2E.model_copy(update={"ft_steps": 4, "ft_e2e_steps": 4})
    quantize_model(model, cfg, QuantizeOptions(calibration=Calibration(tokens(), progress=False), lora_init=init))
    name = "model.layers.0.mlp.down_proj"
    B0, A0 = init.factors[name]
    w_q = model.get_submodule(name).dequantize(torch.float32)
    assert torch.allclose(w_q + B0 @ A0, dense.get_submodule(name).weight.detach(), atol=1e-5)


@pytest.mark.parametrize("bad", [{"ft_e2e_steps": -1}, {"ft_e2e_steps": 2.5}, {"ft_e2e_lr": 0.0},
                                 {"ft_e2e_lr": 3.0}, {"ft_e2e_batch": 0}])
def test_bad_end_to_end_settings_are_clear_errors(bad):
    with pytest.raises(QuantizerConfigError, match=next(iter(bad))):
        get_preset("quip#").config.from_json({"family": "quip#", **bad})


def test_too_few_calibration_sequences_for_the_end_to_end_stage_warn(dense):
    # 16 sequences, 6 steps of 4 -> 1.5 passes: a warning naming the count that would do
    with pytest.warns(UserWarning, match=r"6 steps of 4 sequences over 16 calibration sequences, 1.5 passes.*"
                                         r"at least 24 sequences"):
        quantized(dense, E2E.model_copy(update={"ft_e2e_steps": 6}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one pass or less: nothing to warn about
        quantized(dense, E2E.model_copy(update={"ft_e2e_steps": 4}))
