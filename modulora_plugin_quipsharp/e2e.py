"""QuIP#'s end-to-end fine-tuning: once every decoder block is quantized (and tuned by :mod:`.finetune`), tune
all quantized layers' sign vectors (as reals) and the model's norms together, against the unquantized model's
next-token distribution on the calibration tokens.

The E8P codes stay fixed. The teacher is what the unquantized model fed its output layer (``lm_head``) on the
calibration tokens, ``[n, t, d]``, captured by the core's calibration pipeline before quantization began. The
output layer (and the embeddings) stay dense and are not tuned, so the teacher's logits are rebuilt per batch
through the same layer and no second model is kept. Loss: ``KL(teacher || student)`` of the next-token
distributions, mean over tokens. Every layer decodes its codes in each pass, forward and backward, so one
layer's decoded weight is alive at a time (the activations of one batch are what the stage adds).

After each pass over the calibration set (and after the last step) the sign vectors are rounded to float16
(how the checkpoint stores them) and the KL is measured on the whole calibration set: the best state, the
untuned one included, is what the model keeps. A step that made the calibration loss worse is not kept.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from modulora_core import QuantizedLinear
from modulora_core.calibrate import head_inputs

from .finetune import TunableLayer, release, store, swap

if TYPE_CHECKING:
    from .quantizer import QuipSharpConfig, QuipSharpQuantizer


def kl_to_teacher(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(teacher) || softmax(student))``; logits ``[..., V]`` -> float32 scalar."""
    s = F.log_softmax(student.flatten(0, -2).to(torch.float32), -1)  # (tokens, V)
    t = F.log_softmax(teacher.flatten(0, -2).to(torch.float32), -1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def calibration_kl(model: nn.Module, tokens: torch.Tensor, teacher: torch.Tensor, batch: int) -> float:
    """``KL(teacher || model)`` per token over all of ``tokens`` ``[n, t]`` (``teacher`` ``[n, t, d]``)."""
    head = model.get_output_embeddings()
    total = 0.0
    with torch.no_grad():
        for a in range(0, tokens.shape[0], batch):
            ids = tokens[a:a + batch].to(teacher.device)
            h = head_inputs(model, head, ids)
            total += float(kl_to_teacher(head(h), head(teacher[a:a + batch]))) * ids.shape[0]
    return total / max(1, tokens.shape[0])


def tune_model(model: nn.Module, names: list[str], tokens: torch.Tensor, teacher: torch.Tensor,
               config: QuipSharpConfig, quantizer: QuipSharpQuantizer) -> dict:
    """Tune ``model``'s quantized layers ``names`` and its norms in place; see the module docstring.

    ``tokens`` ``[n, t]``: the calibration tokens; ``teacher`` ``[n, t, d]``: the unquantized model's inputs to
    its output layer on them. Returns ``{"before": kl, "after": kl, "kept": bool, "history": [kl, ...]}``
    (calibration KL per token; the history has one entry per evaluation, the untuned model first).
    """
    head = model.get_output_embeddings()
    layers = {n: model.get_submodule(n) for n in names}
    layers = {n: m for n, m in layers.items() if isinstance(m, QuantizedLinear) and m.family == quantizer.name}
    if not layers or not config.ft_e2e_steps or tokens.shape[0] == 0:
        return {"before": float("nan"), "after": float("nan"), "kept": False, "history": []}
    seen = config.ft_e2e_steps * config.ft_e2e_batch  # sequences the stage's steps draw
    if seen > tokens.shape[0]:
        passes = seen / tokens.shape[0]
        # measured on SmolLM2 (docs/benchmarks.md): 32 steps of 4 over 32 windows took held-out perplexity
        # to 1.55x the dense model's, over 128 windows to 1.35x; the calibration KL fell either way
        warnings.warn(f"{quantizer.name}: the end-to-end stage runs {config.ft_e2e_steps} steps of "
                      f"{config.ft_e2e_batch} sequences over {tokens.shape[0]} calibration sequences, {passes:.1f} "
                      f"passes over each; past the first it mostly fits them, not the held-out text. Calibrate "
                      f"on at least {seen} sequences (modulora finetune: "
                      f"--calibration-samples)", stacklevel=2)
    tunables = {n: TunableLayer(m, quantizer, cache=False) for n, m in layers.items()}
    signs = [p for t in tunables.values() for p in (t.su, t.sv)]
    skip = {id(p) for p in signs} | {id(p) for p in head.parameters()}  # the teacher's logits go through head
    vectors = [p for p in model.parameters() if config.ft_norms and p.dim() == 1 and p.is_floating_point()
               and id(p) not in skip]
    params = signs + vectors
    grad_was = [p.requires_grad for p in vectors]
    for n, t in tunables.items():
        swap(model, n, t)
    bs = config.ft_e2e_batch
    starts = list(range(0, tokens.shape[0], bs))
    try:
        history = [calibration_kl(model, tokens, teacher, bs)]
        best = [p.detach().clone() for p in params]
        best_at = 0
        for p in vectors:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=config.ft_e2e_lr)
        order = torch.randperm(len(starts), generator=torch.Generator().manual_seed(config.seed)).tolist()
        with torch.enable_grad():
            for step in range(config.ft_e2e_steps):
                a = starts[order[step % len(order)]]
                ids = tokens[a:a + bs].to(teacher.device)  # (b, t)
                with torch.no_grad():
                    target = head(teacher[a:a + bs])  # (b, t, V)
                loss = kl_to_teacher(head(head_inputs(model, head, ids)), target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if (step + 1) % len(starts) == 0 or step + 1 == config.ft_e2e_steps:
                    with torch.no_grad():
                        for p in signs:  # what the checkpoint will hold
                            p.copy_(p.to(torch.float16).to(torch.float32))
                    history.append(calibration_kl(model, tokens, teacher, bs))
                    if history[-1] < history[best_at]:
                        best, best_at = [p.detach().clone() for p in params], len(history) - 1
        with torch.no_grad():
            for p, b in zip(params, best, strict=True):
                p.copy_(b)
            for n, t in tunables.items():
                store(layers[n], t)
    finally:
        release(model, layers, vectors, grad_was)
    return {"before": history[0], "after": history[best_at], "kept": best_at > 0, "history": history}
