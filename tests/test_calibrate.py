"""modulora_core.calibrate / calibration_data: block-by-block Hessians, calibration inputs, and their errors."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import modulora
from modulora_core import CalibrationError
from modulora_core.calibrate import decoder_blocks, linear_stages, quantize_blockwise
from modulora_core.calibration_data import Calibration, calibration_tokens, resolve_calibration

VOCAB = 128


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: tiny matmuls, one thread


def tiny(kind: str = "llama", seed: int = 0) -> nn.Module:
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
    torch.manual_seed(seed)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)).eval()
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)).eval()
    return OPTForCausalLM(OPTConfig(ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=64,
                                    **{k: v for k, v in common.items() if k != "num_attention_heads"},
                                    num_attention_heads=4)).eval()


def tokens(n: int = 6, t: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, t), generator=torch.Generator().manual_seed(seed))


def block_linears(model: nn.Module) -> list[str]:
    stack = decoder_blocks(model)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(stack + ".")]


def coarse(module: nn.Linear) -> None:
    """A lossy stand-in for quantization: weights rounded to multiples of 0.05, in place."""
    with torch.no_grad():
        module.weight.copy_(torch.round(module.weight / 0.05) * 0.05)


def reference_hessian(model: nn.Module, name: str, ids: torch.Tensor) -> torch.Tensor:
    """X^T X / rows of module ``name``'s inputs over one full forward of ``model``, in float64."""
    acc: list[torch.Tensor] = []

    def hook(_m, inp):
        x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
        acc.append(x.T @ x / x.shape[0])

    h = model.get_submodule(name).register_forward_pre_hook(hook)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
    h.remove()
    assert len(acc) == 1
    return acc[0]


def run_pipeline(model: nn.Module, ids: torch.Tensor, *, lossy: bool, **cal_kw) -> tuple[dict, list[str]]:
    got: dict[str, torch.Tensor] = {}
    order: list[str] = []

    def quantize(name: str, h: torch.Tensor) -> None:
        got[name] = h.clone()
        order.append(name)
        if lossy:
            coarse(model.get_submodule(name))

    cal = Calibration(ids, progress=False, **cal_kw)
    quantize_blockwise(model, block_linears(model), ids, quantize, cal)
    return got, order


# -- the pipeline ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_hessians_equal_a_full_forward_when_nothing_changes(kind):
    model, ids = tiny(kind), tokens()
    ref_model = copy.deepcopy(model)
    got, _ = run_pipeline(model, ids, lossy=False, batch_size=4)  # batches 4 + 2: a ragged last batch
    names = block_linears(ref_model)
    assert sorted(got) == sorted(names)
    for n in names:
        ref = reference_hessian(ref_model, n, ids)
        assert got[n].dtype == torch.float32 and got[n].shape == ref.shape
        torch.testing.assert_close(got[n].double(), ref, rtol=1e-4, atol=1e-6, msg=f"Hessian of {n}")


@pytest.mark.parametrize("true_sequential", [True, False])
def test_each_stage_sees_the_stages_and_blocks_quantized_before_it(true_sequential):
    model, ids = tiny(), tokens(seed=1)
    dense = copy.deepcopy(model)
    got, order = run_pipeline(model, ids, lossy=True, true_sequential=true_sequential)
    stack = decoder_blocks(dense)
    for n in order:
        before = order[: order.index(n)]
        if not true_sequential:  # the whole block's Hessians come from the block as it was
            block = n.split(".")[: len(stack.split(".")) + 1]
            before = [m for m in before if m.split(".")[: len(block)] != block]
        ref_model = copy.deepcopy(dense)
        for m in before:
            coarse(ref_model.get_submodule(m))
        torch.testing.assert_close(got[n].double(), reference_hessian(ref_model, n, ids), rtol=1e-4, atol=1e-6,
                                   msg=f"Hessian of {n} (true_sequential={true_sequential})")


def test_true_sequential_changes_later_stages_only():
    ids = tokens(seed=1)
    seq, _ = run_pipeline(tiny(), ids, lossy=True, true_sequential=True)
    par, _ = run_pipeline(tiny(), ids, lossy=True, true_sequential=False)
    torch.testing.assert_close(seq["model.layers.0.self_attn.q_proj"], par["model.layers.0.self_attn.q_proj"])
    assert not torch.allclose(seq["model.layers.0.self_attn.o_proj"], par["model.layers.0.self_attn.o_proj"])


def test_llama_stages_are_qkv_o_gateup_down():
    model, ids = tiny(), tokens()
    cal = Calibration(ids, progress=False)
    from modulora_core.calibrate import capture_inputs

    with torch.no_grad():
        batches = capture_inputs(model, model.model.layers[0], ids, cal.batch_size)
    prefix = "model.layers.0."
    names = [n for n in block_linears(model) if n.startswith(prefix)]
    with torch.no_grad():
        stages = linear_stages(model.model.layers[0], prefix, names, batches[0])
    short = [[n[len(prefix):].split(".")[1] for n in s] for s in stages]
    assert short == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def test_progress_bar_counts_blocks(capsys):
    model, ids = tiny(), tokens(n=2)
    quantize_blockwise(model, block_linears(model), ids, lambda n, h: None, Calibration(ids), desc="probe")
    err = capsys.readouterr().err
    assert "probe" in err and "2/2" in err and "block" in err


def test_training_mode_is_restored():
    model, ids = tiny(), tokens(n=2)
    model.train()
    quantize_blockwise(model, block_linears(model), ids, lambda n, h: None, Calibration(ids, progress=False))
    assert model.training


# -- modulora.load with data -----------------------------------------------------------------------------
def test_load_with_token_calibration_quantizes_every_block_linear(tmp_path):
    model, ids = tiny(), tokens(n=8, t=16)
    ref = copy.deepcopy(model)
    q = modulora.load(model, "optq-4bit", calibration=ids, n_samples=4, seq_len=8, lora=None)
    layers = dict(modulora.iter_quantized_layers(q))
    assert sorted(layers) == sorted(block_linears(ref))
    assert all(m.quantizer.name == "optq" for m in layers.values())
    with torch.no_grad():
        a, b = ref(ids).logits, q(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.5  # 4-bit of a random tiny model: close, not equal


def test_load_keeps_the_hessian_dict_form():
    model = tiny()
    names = block_linears(model)
    hess = {n: torch.eye(model.get_submodule(n).in_features) for n in names}
    q = modulora.load(model, "optq-8bit", calibration=hess, lora=None)
    assert len(dict(modulora.iter_quantized_layers(q))) == len(names)


def test_quantizer_without_calibration_skips_it():
    model, ids = tiny(), tokens()
    with pytest.warns(UserWarning, match="needs no calibration"):
        q = modulora.load(model, "rtn-4bit", calibration=ids, lora=None)
    assert len(dict(modulora.iter_quantized_layers(q))) == len(block_linears(tiny()))


def test_targets_outside_the_blocks_are_refused():
    model, ids = tiny(), tokens()
    with pytest.raises(CalibrationError, match="outside the decoder blocks"):
        modulora.load(model, "optq-4bit", calibration=ids, targets=["q_proj", "lm_head"], lora=None)


def test_token_ids_beyond_the_vocabulary_are_refused():
    with pytest.raises(CalibrationError, match="beyond the model's vocabulary"):
        modulora.load(tiny(), "optq-4bit", calibration=tokens() + VOCAB)


# -- calibration data --------------------------------------------------------------------------------------
def char_tokenizer():
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{chr(c): c - 31 for c in range(32, 127)}}  # ids < 96 < VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), "isolated")  # one token per character
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")


TEXT = "Return the sum of a and b.\n\n" * 20  # 560 characters


def test_text_file_is_cut_into_windows_with_the_models_tokenizer(tmp_path):
    d = tmp_path / "m"
    tiny().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    f = tmp_path / "calib.txt"
    f.write_text(TEXT)
    cal = resolve_calibration("optq-4bit", True, str(f), 5, 100)
    ids = calibration_tokens(cal, d)
    assert ids.shape == (5, 100) and ids.dtype == torch.int64
    assert ids[0, :6].tolist() == char_tokenizer()("Return", add_special_tokens=False)["input_ids"]
    q = modulora.load(d, "optq-3bit", calibration=f, n_samples=2, seq_len=50)  # with PEFT LoRA
    assert len(dict(modulora.iter_quantized_layers(q))) == 14


def test_datasets_text_and_input_ids_columns():
    import datasets  # installed with the dev extra (trl needs it): a missing one must fail, not skip
    ds = datasets.Dataset.from_dict({"text": [TEXT[:280], TEXT[280:]]})
    ids = calibration_tokens(Calibration(ds, n_samples=4, seq_len=64, tokenizer=char_tokenizer()))
    assert ids.shape == (4, 64)
    rows = datasets.Dataset.from_dict({"input_ids": tokens(n=5, t=10).tolist()})
    assert torch.equal(calibration_tokens(Calibration(rows, n_samples=3, seq_len=8)), tokens(n=5, t=10)[:3, :8])
    with pytest.raises(CalibrationError, match="pass one split"):
        resolve_calibration("optq-4bit", True, datasets.DatasetDict({"train": ds}), None, None)
    with pytest.raises(CalibrationError, match="text column"):
        calibration_tokens(Calibration(datasets.Dataset.from_dict({"body": ["x"]})))


def test_token_forms():
    t = tokens(n=3, t=10)
    assert torch.equal(calibration_tokens(Calibration(t)), t)
    assert torch.equal(calibration_tokens(Calibration(list(t), seq_len=7)), t[:, :7])
    assert torch.equal(calibration_tokens(Calibration([r.tolist() for r in t], n_samples=2)), t[:2])
    assert torch.equal(calibration_tokens(Calibration({"input_ids": t})), t)
    stream = calibration_tokens(Calibration(t.reshape(-1), seq_len=10))  # 1-D: one stream, windows
    assert torch.equal(stream, t)


@pytest.mark.parametrize(("cal", "match"), [
    (Calibration([]), "empty"),
    (Calibration(tokens(n=3), n_samples=4), "3 samples but n_samples=4"),
    (Calibration([torch.arange(10), torch.arange(5)], seq_len=8), "shorter than seq_len=8"),
    (Calibration([torch.arange(10), torch.arange(5)]), "different lengths"),
    (Calibration(torch.arange(30), seq_len=8, n_samples=4), "3 sequences of seq_len=8"),
    (Calibration(torch.arange(5), seq_len=8), "fewer than one sequence"),
    (Calibration(torch.rand(2, 8)), "integer token ids"),
    (Calibration([torch.arange(4), torch.arange(0)]), "shorter than seq_len|empty sample"),
    (Calibration(3.5), "cannot use a float"),
    (Calibration("/no/such/file.txt"), "is not a file"),
])
def test_bad_calibration_data_is_a_clear_error(cal, match):
    with pytest.raises(CalibrationError, match=match):
        calibration_tokens(cal)


def test_text_without_a_tokenizer_is_a_clear_error(tmp_path: Path):
    f = tmp_path / "c.txt"
    f.write_text(TEXT)
    with pytest.raises(CalibrationError, match="needs a tokenizer"):
        calibration_tokens(Calibration(f))
    with pytest.raises(CalibrationError, match="none loads from"):
        calibration_tokens(Calibration(f), tmp_path)


def test_resolve_calibration():
    with pytest.raises(CalibrationError, match="needs calibration data"):
        resolve_calibration("optq-4bit", True, None, None, None)
    with pytest.raises(CalibrationError, match="positive int"):
        resolve_calibration("optq-4bit", True, tokens(), 0, None)
    with pytest.raises(CalibrationError, match="must be"):
        resolve_calibration("optq-4bit", True, {"a": 1}, None, None)
    cal = resolve_calibration("optq-4bit", True, Calibration(tokens(), seq_len=4), 2, None)
    assert (cal.n_samples, cal.seq_len) == (2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_calibration("rtn-4bit", False, None, None, None) is None


def test_load_calibrates_on_a_datasets_dataset(tmp_path):
    import datasets

    d = tmp_path / "m"
    tiny().save_pretrained(d)
    char_tokenizer().save_pretrained(d)
    ds = datasets.Dataset.from_dict({"text": [TEXT[:300], TEXT[300:]]})
    q = modulora.load(d, "optq-4bit", calibration=ds, n_samples=2, seq_len=50, lora=None)
    assert len(dict(modulora.iter_quantized_layers(q))) == 14
