"""QuIP#'s fine-tuning stage: tune a quantized decoder block's continuous parameters against the unquantized
block's outputs.

The E8P codes stay fixed. What moves, by Adam on the calibration tokens:

- each quantized layer's sign vectors SU ``[n]`` and SV ``[m]``, relaxed to real vectors: the layer becomes
  ``x -> SV * H_m^T (scale * decode(codes)) H_n (SU * x)``, so SU rescales the input channels and SV the output
  channels of the rotated weight (SV also absorbs the layer scale, which is therefore not tuned apart);
- with ``ft_norms``, the block's vector parameters: norm weights and biases (stored dense by the checkpoint).

The loss is the squared error of the block's output against the unquantized block's output on the same
inputs (the quantized-so-far model's activations, which the calibration pipeline replays), relative to the
target's energy. QuIP# itself tunes each block while quantizing its linears one after another, the still
dense ones too; here the whole block is quantized first and tuned once: one tuning run per block instead of
one per linear, and the calibration pipeline stays as it is. The tuned values are rounded to float16 (how
they are stored) before the final check: if they do not beat the untuned block on all calibration batches,
the block is left as it was.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from modulora_core import QuantizedLinear

from .incoherence import Incoherence

if TYPE_CHECKING:
    from collections.abc import Callable

    from .quantizer import QuipSharpConfig, QuipSharpQuantizer


class _CodesMatmul(torch.autograd.Function):
    """``x1 [..., n] -> x1 @ C^T [..., m]``, ``C`` a layer's decoded codes ``[m, n]`` float32, decoded again
    for the backward instead of kept (decoding costs a few percent of the product)."""

    @staticmethod
    def forward(ctx, x1: torch.Tensor, packed: Any, quantizer: QuipSharpQuantizer) -> torch.Tensor:
        ctx.packed, ctx.quantizer = packed, quantizer
        return x1 @ quantizer.decoded(packed, slice(0, packed.shape[0]), torch.float32).T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        codes = ctx.quantizer.decoded(ctx.packed, slice(0, ctx.packed.shape[0]), torch.float32)
        return grad @ codes, None, None


class TunableLayer(nn.Module):
    """A quantized layer during tuning: decoded codes fixed, ``su`` ``[n]`` and ``sv`` ``[m]`` trainable.

    ``cache``: keep the decoded codes (``[m, n]`` float32) for the whole run (one block's layers at a time);
    else decode them in every pass (the end-to-end stage, where every layer of the model is tunable).
    """

    def __init__(self, layer: QuantizedLinear, quantizer: QuipSharpQuantizer, cache: bool = True) -> None:
        super().__init__()
        packed = layer.packed
        m, n = packed.shape
        self.packed, self.quantizer = packed, quantizer
        self.register_buffer("codes", quantizer.decoded(packed, slice(0, m), torch.float32) if cache else None)
        self.register_buffer("scale", packed.tensors["scale"].to(torch.float32))
        inc = quantizer.incoherence(packed)
        self.su = nn.Parameter(inc.su.to(torch.float32).clone())
        self.sv = nn.Parameter(inc.sv.to(torch.float32).clone())
        self.rot_in, self.rot_out = inc.rot_in, inc.rot_out
        self.bias = layer.bias  # the same Parameter: tuned in place when the norms and biases are

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[..., n] -> [..., m]`` in float32 arithmetic, x's dtype out."""
        inc = Incoherence(self.su, self.sv, self.rot_in, self.rot_out)
        x1 = inc.forward(x.to(torch.float32), "in")
        y = x1 @ self.codes.T if self.codes is not None else _CodesMatmul.apply(x1, self.packed, self.quantizer)
        y = inc.backward(y * self.scale, "out")
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype)


def _relative_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||out_t - target_t||^2 / ||target_t||^2``, ``[..., d]`` -> a float32 scalar.

    Per token, because the next block's RMSNorm divides each token by its own RMS: an error on a token with
    massive activations (the first token of a sequence, in SmolLM2 from its 12th block on) reaches it scaled
    down, and a plain squared error would be dominated by those tokens (measured on SmolLM2 quip#-2bit with
    16 steps: perplexity 35.3 with this loss, 36.6 with the squared error relative to the whole target's).
    """
    diff = out.to(torch.float32) - target.to(torch.float32)
    energy = target.to(torch.float32).square().sum(-1).clamp_min(1e-30)
    return (diff.square().sum(-1) / energy).mean()


def block_error(run: Callable[[int], torch.Tensor], targets: list[torch.Tensor]) -> float:
    """Mean over the calibration batches of the block's per-token relative squared output error."""
    with torch.no_grad():
        return sum(float(_relative_error(run(j), t)) for j, t in enumerate(targets)) / max(1, len(targets))


def swap(block: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(block.get_submodule(parent) if parent else block, leaf, module)


def tune_block(block: nn.Module, names: list[str], run: Callable[[int], torch.Tensor],
               targets: list[torch.Tensor], config: QuipSharpConfig, quantizer: QuipSharpQuantizer) -> dict:
    """Tune ``block``'s quantized layers ``names`` (relative to the block) in place; see the module docstring.

    ``run(j)`` is the block's output ``[b, t, d]`` on calibration batch ``j``, ``targets[j]`` the unquantized
    block's. Returns ``{"before": err, "after": err, "kept": bool}`` (mean relative squared error).
    """
    layers = {n: block.get_submodule(n) for n in names}
    layers = {n: m for n, m in layers.items() if isinstance(m, QuantizedLinear) and m.family == quantizer.name}
    if not layers or not targets:
        return {"before": float("nan"), "after": float("nan"), "kept": False}
    tunables = {n: TunableLayer(m, quantizer) for n, m in layers.items()}
    signs = [p for t in tunables.values() for p in (t.su, t.sv)]
    sign_ids = {id(p) for p in signs}
    vectors = []
    if config.ft_norms:
        vectors = [p for p in block.parameters()
                   if p.dim() == 1 and p.is_floating_point() and id(p) not in sign_ids]
    grad_was = [p.requires_grad for p in vectors]
    saved = [p.detach().clone() for p in vectors]
    for n, t in tunables.items():
        swap(block, n, t)
    try:
        before = block_error(run, targets)
        for p in vectors:
            p.requires_grad_(True)
        opt = torch.optim.Adam([{"params": signs}, {"params": vectors}], lr=config.ft_lr)
        order = torch.randperm(len(targets), generator=torch.Generator().manual_seed(config.seed)).tolist()
        with torch.enable_grad():
            for step in range(config.ft_steps):
                j = order[step % len(order)]
                loss = _relative_error(run(j), targets[j])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        with torch.no_grad():
            for p in signs:  # what the checkpoint will hold
                p.copy_(p.to(torch.float16).to(torch.float32))
        after = block_error(run, targets)
        kept = after < before
        with torch.no_grad():
            if not kept:  # tuning made it worse on the calibration data (a too-large lr): leave it untouched
                for p, s in zip(vectors, saved, strict=True):
                    p.copy_(s)
            for n, t in tunables.items():
                if kept:
                    store(layers[n], t)
    finally:
        release(block, layers, vectors, grad_was)
    return {"before": before, "after": after, "kept": kept}


def release(root: nn.Module, layers: dict[str, nn.Module], vectors: list[nn.Parameter],
            grad_was: list[bool]) -> None:
    """The end of a tuning run: the quantized ``layers`` back in ``root`` in place of their tunable forms,
    the tuned vector parameters back to their ``requires_grad``."""
    for p, g in zip(vectors, grad_was, strict=True):
        p.requires_grad_(g)
    for n, m in layers.items():
        swap(root, n, m)


def store(layer: QuantizedLinear, tuned: TunableLayer) -> None:
    """Write the tuned sign vectors into ``layer``'s packed buffers (float16 ``[n]`` / ``[m]``)."""
    for key, value in (("su", tuned.su), ("sv", tuned.sv)):
        buf = getattr(layer, f"packed_{key}")
        if not buf.is_floating_point() or buf.shape != value.shape:
            raise ValueError(f"quip# layer stores {key} as {buf.dtype} {tuple(buf.shape)}; tuning needs the "
                             f"real-valued form (quantize with ft_steps or ft_e2e_steps > 0)")
        buf.copy_(value.detach().to(buf.dtype))
