"""Block-by-block calibration: input Hessians ``X^T X`` for quantizers that need them (OPTQ, QuIP#).

The model runs one decoder block at a time. The first block's inputs are captured (hidden states plus
whatever the model passes along: attention mask, position ids, rotary embeddings), so every later step
replays exactly what the model computes. For each block, forward hooks accumulate each targeted linear's
``X^T X`` in float32; the quantizer replaces the linears (stage by stage when true-sequential, each stage
seeing the earlier stages already quantized); then the block's outputs are recomputed with the quantized
weights and become the next block's inputs, in place. Only one block's activations for the calibration set
are alive at any time.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .calibration_data import Calibration
from .errors import CalibrationError
from .quantizer import BlockTune, ModelTune

QuantizeFn = Callable[[str, torch.Tensor], None]  # (module name, Hessian [in, in]) -> swaps the module


def decoder_blocks(model: nn.Module) -> str | None:
    """Name of the decoder stack: the ``nn.ModuleList`` with the most parameters (``model.layers``, ...)."""
    best, best_n = None, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList):
            n = sum(p.numel() for p in m.parameters())
            if n > best_n:
                best, best_n = name, n
    return best


class _Stop(Exception):
    """Raised from a hook to end a forward early (all we needed from it has been seen)."""


@dataclass
class _Batch:
    """One batch's input to the current block: hidden states ``[b, t, d]`` plus the other arguments."""

    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    by_name: bool  # hidden states were passed as hidden_states=, not positionally

    def call(self, block: nn.Module) -> Any:
        if self.by_name:
            return block(*self.args, hidden_states=self.hidden, **self.kwargs)
        return block(self.hidden, *self.args, **self.kwargs)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def capture_inputs(model: nn.Module, first_block: nn.Module, tokens: torch.Tensor,
                   batch_size: int) -> list[_Batch]:
    """Run the model on ``tokens`` ``[n, t]`` up to ``first_block`` and keep what it receives, per batch."""
    batches: list[_Batch] = []

    def grab(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
        by_name = not args
        hidden = kwargs.pop("hidden_states") if by_name else args[0]
        batches.append(_Batch(hidden, tuple(args[1:]), dict(kwargs), by_name))
        raise _Stop

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        _run_until_stopped(model, tokens, batch_size, "its first decoder block; calibration needs a model that "
                           "runs its blocks in order")
    finally:
        handle.remove()
    return batches


def _run_until_stopped(model: nn.Module, tokens: torch.Tensor, batch_size: int, where: str) -> None:
    """Run ``model`` on ``tokens`` ``[n, t]`` batch by batch; a hook must end each forward with ``_Stop``."""
    device = next(model.parameters()).device
    for a in range(0, tokens.shape[0], batch_size):
        ids = tokens[a:a + batch_size].to(device)  # (b, t)
        try:
            model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        except _Stop:
            continue
        raise CalibrationError(f"{type(model).__name__}'s forward never reached {where}")


def head_inputs(model: nn.Module, head: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What ``model`` feeds its output layer ``head`` on ``ids`` ``[b, t]``: ``[b, t, d]``, the forward stopped
    there (the logits are not computed); autograd as the caller set it."""
    out: list[torch.Tensor] = []

    def grab(_mod: nn.Module, args: tuple) -> None:
        out.append(args[0])
        raise _Stop

    handle = head.register_forward_pre_hook(grab)
    try:
        _run_until_stopped(model, ids, ids.shape[0], "its output layer")
    finally:
        handle.remove()
    return out[0]


def capture_head_inputs(model: nn.Module, tokens: torch.Tensor, batch_size: int) -> torch.Tensor:
    """:func:`head_inputs` of ``model`` on ``tokens`` ``[n, t]``, batch by batch, detached: ``[n, t, d]``."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise CalibrationError(f"{type(model).__name__} has no output embeddings (lm_head), whose inputs "
                               "end-to-end tuning compares; tune the decoder blocks alone instead")
    return torch.cat([head_inputs(model, head, tokens[a:a + batch_size]).detach()
                      for a in range(0, tokens.shape[0], batch_size)])  # (n, t, d)


def linear_stages(block: nn.Module, prefix: str, names: list[str], batch: _Batch,
                  groups: dict[str, str] | None = None) -> list[list[str]]:
    """``names`` grouped by shared input, in call order: q/k/v, o, gate/up, down for a Llama block.

    Found by running ``block`` once and noting which linears receive the very same input tensor. Names in
    ``groups`` (one matrix of every expert of a MoE layer) form one stage per group whatever the routing,
    also for experts this batch routed no token to.
    """
    groups = groups or {}
    inputs: list[tuple[torch.Tensor, list[str]]] = []
    handles = []

    def note(name: str) -> Callable:
        def hook(_m: nn.Module, inp: tuple) -> None:
            for x, group in inputs:
                if x is inp[0]:
                    group.append(name)
                    return
            inputs.append((inp[0], [name]))
        return hook

    for n in names:
        handles.append(block.get_submodule(n[len(prefix):]).register_forward_pre_hook(note(n)))
    try:
        batch.call(block)
    finally:
        for h in handles:
            h.remove()
    stages: list[list[str]] = []
    by_group: dict[str, list[str]] = {}
    for _, group in inputs:
        key = groups.get(group[0]) if all(n in groups for n in group) else None
        if key is None:
            stages.append(group)
        elif key in by_group:
            by_group[key].extend(group)
        else:
            by_group[key] = list(group)
            stages.append(by_group[key])
    for n in names:  # experts that got no token from this batch join their group's stage
        key = groups.get(n)
        if key is not None and n not in by_group.get(key, ()):
            if key not in by_group:
                by_group[key] = []
                stages.append(by_group[key])
            by_group[key].append(n)
    seen = {n for g in stages for n in g}
    missing = [n for n in names if n not in seen]
    if missing:
        raise CalibrationError(f"{missing[:3]} received no input when their block ran on calibration data, so "
                               "they have no Hessian; leave them out of target_modules")
    return stages


def accumulate_hessians(block: nn.Module, prefix: str, names: list[str], batches: list[_Batch],
                        groups: dict[str, str] | None = None,
                        unrouted: list[str] | None = None) -> dict[str, torch.Tensor]:
    """``{name: X^T X / rows}`` ``[in, in]`` float32 over every batch, stopping each forward once all of
    ``names`` have seen their input.

    An expert's matrix (a name in ``groups``) that no calibration token was routed to gets the mean Hessian
    of the same matrix of the experts that got tokens (its name is appended to ``unrouted``): the best
    guess of its input statistics, where the identity would ignore them and zero leaves it unsolvable.
    """
    groups = groups or {}
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = dict.fromkeys(names, 0)
    seen: set[str] = set()

    def hook_for(name: str) -> Callable:
        def hook(_m: nn.Module, inp: tuple) -> None:
            x = inp[0].detach()
            x = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (tokens, in)
            if name not in sums:
                sums[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
            sums[name].addmm_(x.T, x)
            rows[name] += x.shape[0]
            seen.add(name)
            if len(seen) == len(names):
                raise _Stop  # the rest of the block cannot change these inputs
        return hook

    handles = [block.get_submodule(n[len(prefix):]).register_forward_pre_hook(hook_for(n)) for n in names]
    try:
        for b in batches:
            seen.clear()
            try:
                b.call(block)
            except _Stop:
                pass
    finally:
        for h in handles:
            h.remove()
    out = {}
    for n in names:
        if n not in sums and n in groups:
            continue  # filled from its siblings below
        if n not in sums:
            raise CalibrationError(f"{n} received no input when its block ran on calibration data, so it has "
                                   "no Hessian; leave it out of target_modules")
        h = sums[n].div_(rows[n])
        if not bool(torch.isfinite(h).all()):
            raise CalibrationError(f"the calibration inputs of {n} have NaN/inf values (its Hessian is not "
                                   "finite); check the model's dtype (float16 overflows) and the calibration data")
        out[n] = h
    for n in names:
        if n in out:
            continue
        siblings = [out[s] for s in names if s in out and groups.get(s) == groups[n]]
        if not siblings:
            raise CalibrationError(f"no calibration token was routed to any expert of {groups[n]}, so they have "
                                   f"no Hessian; calibrate with more samples (n_samples)")
        out[n] = torch.stack(siblings).mean(0)
        if unrouted is not None:
            unrouted.append(n)
    return out


def quantize_blockwise(model: nn.Module, names: list[str], tokens: torch.Tensor, quantize: QuantizeFn,
                       cal: Calibration, desc: str = "calibrating", tune: BlockTune | None = None,
                       tune_model: ModelTune | None = None) -> None:
    """Quantize ``names`` (linears inside the decoder blocks) with Hessians from ``tokens`` ``[n, t]``.

    ``quantize(name, hessian)`` must replace module ``name`` by its quantized form; the next stage and
    block see its output. ``tune``: called on each block once its linears are quantized, with the
    unquantized block's outputs on the same inputs as targets. ``tune_model``: called once every block is
    done, with the unquantized model's inputs to its output layer on ``tokens`` (one dense forward before
    quantization begins; ``[n, t, d]`` kept until then). A progress bar counts blocks.
    """
    from tqdm.auto import tqdm

    stack = decoder_blocks(model)
    if stack is None:
        raise CalibrationError(f"found no decoder-block ModuleList in {type(model).__name__}; block-by-block "
                               "calibration needs one (model.layers, transformer.h, ...)")
    blocks = model.get_submodule(stack)
    per_block: dict[int, list[str]] = {}
    outside = []
    for n in names:
        head, _, rest = n.partition(stack + ".")
        idx = rest.split(".", 1)[0] if not head and rest else ""
        if idx.isdigit():
            per_block.setdefault(int(idx), []).append(n)
        else:
            outside.append(n)
    if outside:
        raise CalibrationError(f"{outside[:3]} lie outside the decoder blocks ({stack}), which calibration "
                               "covers; leave them out of target_modules (PEFT's 'all-linear' already does)")
    vocab = getattr(model.get_input_embeddings(), "num_embeddings", None) if hasattr(
        model, "get_input_embeddings") else None
    if vocab is not None and tokens.numel() and int(tokens.max()) >= vocab:
        raise CalibrationError(f"calibration has token id {int(tokens.max())}, beyond the model's vocabulary "
                               f"of {vocab}; tokenize with the model's own tokenizer")

    from .experts import expert_groups

    groups = expert_groups(model, names)
    unrouted: list[str] = []
    was_training = model.training
    model.eval()
    stage_cache: dict[tuple[str, ...], list[list[str]]] = {}
    try:
        with torch.no_grad():
            teacher = capture_head_inputs(model, tokens, cal.batch_size) if tune_model is not None else None
            batches = capture_inputs(model, blocks[0], tokens, cal.batch_size)
            last = max(per_block, default=-1)  # blocks after the last targeted one need no inputs
            for i in tqdm(range(last + 1), desc=desc, unit="block", disable=not cal.progress):
                block, prefix = blocks[i], f"{stack}.{i}."
                targets = per_block.get(i, [])
                wanted = [_first(b.call(block)) for b in batches] if targets and tune is not None else None
                if targets:
                    rel = tuple(n[len(prefix):] for n in targets)
                    if not cal.true_sequential:
                        stages = [targets]
                    elif rel in stage_cache:  # blocks of one model share their layout: detect it once
                        stages = [[prefix + r for r in s] for s in stage_cache[rel]]
                    else:
                        stages = linear_stages(block, prefix, targets, batches[0], groups)
                        stage_cache[rel] = [[n[len(prefix):] for n in s] for s in stages]
                    for stage in stages:
                        hessians = accumulate_hessians(block, prefix, stage, batches, groups, unrouted)
                        for n in stage:
                            quantize(n, hessians.pop(n))
                    if wanted is not None:
                        tune(block, list(rel), lambda j, blk=block: _first(batches[j].call(blk)), wanted)
                        del wanted
                if i < last:
                    for b in batches:  # the quantized block's outputs are the next block's inputs
                        b.hidden = _first(b.call(block))
        batches.clear()  # the last block's activations: not needed by the model's tuning stage
        if tune_model is not None:
            tune_model(model, names, tokens, teacher)
    finally:
        model.train(was_training)
    if unrouted:
        n_experts = len(groups)
        warnings.warn(f"calibration routed no token to {len(unrouted)} of {n_experts} expert matrices (e.g. "
                      f"{unrouted[:3]}); they were quantized with the mean Hessian of the same matrix of the "
                      f"experts that got tokens. More calibration samples (n_samples) reach more experts",
                      stacklevel=3)
