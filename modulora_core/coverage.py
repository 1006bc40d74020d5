"""How much of a model's decoder blocks is packed, and a warning naming what stays dense.

Coverage counts the matrix weights (parameters of 2 or more dimensions) inside the decoder blocks: those
packed by a plugin, those kept dense on purpose (MoE routers, modules the user skipped), and those left
dense because no one can pack their module type - the last are what :func:`warn_dense` reports.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

from .calibrate import decoder_blocks
from .layouts import is_quantizable, is_router, matches_target
from .qlinear import QuantizedLinear


@dataclass
class Coverage:
    """Decoder-block matrix weights by fate: packed, dense on purpose, dense for want of a quantizer."""

    packed: int = 0
    by_design: dict[str, int] = field(default_factory=dict)  # routers, skipped or untargeted: name -> numel
    dense: dict[str, int] = field(default_factory=dict)  # parameter name -> numel
    dense_types: dict[str, str] = field(default_factory=dict)  # parameter name -> module class

    @property
    def total(self) -> int:
        return self.packed + sum(self.by_design.values()) + sum(self.dense.values())

    @property
    def fraction(self) -> float:
        """Packed share of all decoder-block matrix weights (routers included)."""
        return self.packed / self.total if self.total else 0.0

    @property
    def fraction_of_quantizable(self) -> float:
        """Packed share of the decoder-block matrix weights that are not dense on purpose."""
        n = self.packed + sum(self.dense.values())
        return self.packed / n if n else 0.0


def coverage(model: nn.Module, skip: Iterable[str] = ()) -> Coverage:
    """The :class:`Coverage` of ``model``'s decoder blocks; ``skip``: suffixes left dense on purpose."""
    skip = list(skip)
    cov = Coverage()
    stack = decoder_blocks(model)
    if stack is None:
        return cov
    for name, m in model.named_modules():
        if not name.startswith(stack + "."):
            continue
        if isinstance(m, QuantizedLinear):
            cov.packed += m.out_features * m.in_features
            continue
        for pname, p in m.named_parameters(recurse=False):
            full = f"{name}.{pname}"
            if p.dim() < 2 or ".lora_" in full or "lora_magnitude" in full:
                continue
            owner = name.removesuffix(".base_layer")
            # a linear left out of the targets is the user's choice, not a gap in what can be packed
            if is_router(owner) or (skip and matches_target(owner, skip)) or is_quantizable(m):
                cov.by_design[full] = p.numel()
            else:
                cov.dense[full] = p.numel()
                cov.dense_types[full] = type(m).__name__
    return cov


def warn_dense(model: nn.Module, skip: Iterable[str] = ()) -> Coverage:
    """Warn when some decoder-block matrices stay dense though nothing asked for it: names, module types
    and their share of the decoder-block matrix weights. Returns the coverage."""
    cov = coverage(model, skip)
    if cov.dense:
        names = sorted(cov.dense)
        share = sum(cov.dense.values()) / cov.total
        types = sorted(set(cov.dense_types.values()))
        warnings.warn(
            f"{len(names)} decoder-block matrices stay dense ({share:.1%} of the decoder-block matrix weights): "
            f"no installed quantizer packs module type(s) {types}; e.g. {names[:6]}. They train and save as "
            f"ordinary dense weights; pass modules_to_not_convert=[...] (--skip) naming them to silence this",
            stacklevel=3)
    return cov
