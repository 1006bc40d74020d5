"""modulora.finetune.train: the stock HF Trainer on a PeftModel over a ModuLoRA base — adapter-only atomic
checkpoints, resume on the same loss curve (LoRA and DoRA), Ctrl-C -> checkpoint, gradient checkpointing,
DDP exclusions."""

from __future__ import annotations

import os
import shutil
import signal
import warnings
from pathlib import Path

import pytest
import safetensors
import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

import modulora
from modulora.finetune.data import Example
from modulora.finetune.encoding import EncodedDataset, PadCollator
from modulora.finetune.models import lora_config
from modulora.finetune.tiny import tiny_llama_dir
from modulora.finetune.train import (
    STAGING_DIR,
    GracefulStop,
    ModuLoRATrainer,
    TrainConfig,
    exclude_frozen_from_ddp,
    last_checkpoint,
    loss_history,
    training_arguments,
)
from modulora_core.errors import CheckpointError

EXAMPLES = [Example(f"Repeat {w}", f"{w} {w}") for w in
            "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tiny_llama_dir(tmp_path_factory.mktemp("tiny"))


def peft_model(tiny: Path, **lora) -> PeftModel:
    """The tiny model quantized with rtn-4bit, PEFT adapters (r=4) on every quantized linear."""
    base = modulora.load(AutoModelForCausalLM.from_pretrained(tiny), "rtn-4bit", lora=None)
    torch.manual_seed(0)
    return get_peft_model(base, lora_config(base, **{"r": 4, **lora}))


def make(tiny: Path, out: Path, *, steps: int = 6, save_steps: int = 3, gc: bool = False, callbacks=(), **lora):
    model = peft_model(tiny, **lora)
    tok = AutoTokenizer.from_pretrained(tiny)
    cfg = TrainConfig(max_steps=steps, batch_size=4, save_steps=save_steps, logging_steps=1, learning_rate=5e-3,
                      gradient_checkpointing=gc, warmup_ratio=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = training_arguments(cfg, out, progress=False)
    ds = EncodedDataset(tok, EXAMPLES, 64)
    return ModuLoRATrainer(model=model, args=args, train_dataset=ds, data_collator=PadCollator(tok.pad_token_id),
                           callbacks=list(callbacks))


def test_checkpoints_hold_the_adapter_not_the_base(tiny, tmp_path):
    tr = make(tiny, tmp_path, steps=3, save_steps=3)
    tr.train()
    ck = tmp_path / "checkpoint-3"
    files = set(os.listdir(ck))
    assert {"adapter_config.json", "adapter_model.safetensors", "modulora_config.json", "optimizer.pt",
            "scheduler.pt", "trainer_state.json"} <= files, files
    assert not any(f.startswith("model") for f in files), files
    with safetensors.safe_open(str(ck / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(".lora_A.weight" in k or ".lora_B.weight" in k for k in keys)
    assert not (tmp_path / STAGING_DIR).exists()
    assert last_checkpoint(tmp_path) == ck


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_resume_continues_the_same_loss_curve(tiny, tmp_path, dora):
    full = make(tiny, tmp_path / "full", dora=dora)
    full.train()
    straight = dict(loss_history(full))
    # a second run stopped after step 3: resume it from its checkpoint with a freshly initialized model
    part = tmp_path / "part"
    shutil.copytree(tmp_path / "full" / "checkpoint-3", part / "checkpoint-3")
    resumed = make(tiny, part, dora=dora)
    resumed.train(resume_from_checkpoint=str(last_checkpoint(part)))
    again = dict(loss_history(resumed))
    assert straight[1] > straight[6]  # it learns
    for step in (4, 5, 6):
        assert again[step] == pytest.approx(straight[step], rel=1e-5), (step, again, straight)


class _SigintAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, handled between two bytecodes


def test_ctrl_c_saves_a_checkpoint_and_stops(tiny, tmp_path):
    previous = signal.getsignal(signal.SIGINT)
    stopper = GracefulStop().install()
    try:
        tr = make(tiny, tmp_path, steps=50, save_steps=0, callbacks=[_SigintAt(2), stopper])
        tr.train()
    finally:
        stopper.uninstall()
    assert stopper.stopped_at in (2, 3) and tr.state.global_step == stopper.stopped_at
    assert last_checkpoint(tmp_path) == tmp_path / f"checkpoint-{stopper.stopped_at}"
    assert signal.getsignal(signal.SIGINT) is previous


def test_incomplete_checkpoint_is_refused(tmp_path):
    (tmp_path / "checkpoint-7").mkdir()
    (tmp_path / "checkpoint-7" / "optimizer.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="incomplete"):
        last_checkpoint(tmp_path)
    assert last_checkpoint(tmp_path / "absent") is None


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    grads = []
    for gc in (False, True):
        m = peft_model(tiny)
        for n, p in m.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)  # nonzero B: gradients reach A too
        if gc:
            m.activation_checkpointing_enable()  # use_reentrant=False, input grads enabled
        m.train()
        x = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(1))
        m(input_ids=x, labels=x).loss.backward()
        grads.append([p.grad.clone() for p in modulora.lora_parameters(m)])
    for a, b in zip(*grads, strict=False):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_checkpointing_through_the_trainer(tiny, tmp_path):
    tr = make(tiny, tmp_path, steps=2, save_steps=0, gc=True)
    tr.train()
    assert tr.model.is_activation_checkpointing and len(loss_history(tr)) == 2


def test_ddp_skips_every_frozen_tensor(tiny):
    m = modulora.load(AutoModelForCausalLM.from_pretrained(tiny), "rtn-4bit")
    ignored = set(exclude_frozen_from_ddp(m))
    assert ignored == set(m._ddp_params_and_buffers_to_ignore)
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert trainable and not trainable & ignored
    assert {n for n, _ in m.named_buffers() if ".packed_" in n} <= ignored
