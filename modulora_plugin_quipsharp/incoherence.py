"""Incoherence processing: randomized Hadamard transforms on both sides of an ``[m, n]`` weight.

With ``U = H_n diag(SU)`` and ``V = H_m diag(SV)`` (``H`` the orthogonal transforms of :mod:`.hadamard`,
``SU``/``SV`` random sign vectors), the weight is quantized as ``W~ = V W U^T`` against the Hessian
``U H U^T``, and the layer runs as ``x W^T = ((x SU) H_n^T) W~^T H_m SV``: transforms of the activations
around a product with the decoded codes, never a dense rotated-back ``W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import hadamard
from .hadamard import HadamardPlan


def random_signs(n: int, generator: torch.Generator) -> torch.Tensor:
    """``[n]`` float32 of +-1, uniform."""
    return torch.randint(0, 2, (n,), generator=generator, dtype=torch.int64, device="cpu").to(torch.float32).mul_(2).sub_(1)


def pack_signs(signs: torch.Tensor) -> torch.Tensor:
    """``[n]`` +-1 (n a multiple of 8) -> ``[n / 8]`` uint8, bit ``i % 8`` of byte ``i // 8`` set for -1."""
    bits = (signs < 0).to(torch.uint8).view(-1, 8)
    return (bits << torch.arange(8, dtype=torch.uint8, device=bits.device)).sum(-1, dtype=torch.uint8).contiguous()


def unpack_signs(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`pack_signs`: ``[n / 8]`` uint8 -> ``[n]`` +-1 in ``dtype``.

    A floating ``[n]`` tensor is a sign vector stored as real values (tuned by :mod:`.finetune`): returned
    as it is, in ``dtype``.
    """
    if packed.is_floating_point():
        return packed.to(dtype)
    bits = (packed[:, None] >> torch.arange(8, dtype=torch.uint8, device=packed.device)) & 1
    return (1 - 2 * bits.to(torch.int8)).reshape(-1).to(dtype)


@dataclass
class Incoherence:
    """The two sides' transforms: input (size ``n``: ``SU``, ``H_n``) and output (size ``m``: ``SV``, ``H_m``).

    ``rot_in`` / ``rot_out`` hold the ``[K, K]`` random orthogonal factor of a side whose size has no
    Hadamard construction here (else None).
    """

    su: torch.Tensor  # (n,) +-1
    sv: torch.Tensor  # (m,) +-1
    rot_in: torch.Tensor | None = None
    rot_out: torch.Tensor | None = None

    @classmethod
    def draw(cls, m: int, n: int, seed: int, device: torch.device | str = "cpu") -> Incoherence:
        """Fresh random signs (and random factors where needed) for an ``[m, n]`` weight, from ``seed``, on
        ``device`` (drawn on the CPU generator, so the same seed gives the same signs on every device)."""
        g = torch.Generator().manual_seed(seed)
        su, sv = random_signs(n, g), random_signs(m, g)
        rots = []
        for size in (n, m):
            p = hadamard.plan(size)
            sub_seed = int(torch.randint(0, 2**62, (1,), generator=g, device="cpu"))
            rots.append(hadamard.random_orthogonal(p.k, sub_seed) if p.random else None)
        su, sv = su.to(device), sv.to(device)
        return cls(su, sv, *(None if r is None else r.to(device) for r in rots))

    @property
    def plan_in(self) -> HadamardPlan:
        return hadamard.plan(self.su.numel())

    @property
    def plan_out(self) -> HadamardPlan:
        return hadamard.plan(self.sv.numel())

    def _mats(self, side: str, like: torch.Tensor) -> tuple[list[torch.Tensor], float]:
        p, rot = (self.plan_in, self.rot_in) if side == "in" else (self.plan_out, self.rot_out)
        mats = hadamard.factors_on(p, rot, like.dtype, like.device)
        return mats, p.norm

    def _signs(self, side: str, like: torch.Tensor) -> torch.Tensor:
        return (self.su if side == "in" else self.sv).to(dtype=like.dtype, device=like.device)

    def forward(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """``[..., k] -> [..., k]``: each row vector ``v`` becomes ``H (S v)`` (``S`` the side's signs)."""
        mats, norm = self._mats(side, x)
        return hadamard.kron_apply(x * self._signs(side, x), mats) * norm

    def backward(self, x: torch.Tensor, side: str) -> torch.Tensor:
        """The inverse of :meth:`forward`: ``v -> S H^T v``."""
        mats, norm = self._mats(side, x)
        return hadamard.kron_apply(x, mats, transpose=True) * (norm * self._signs(side, x))

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """``W [m, n] -> W~ = V W U^T`` in float64."""
        w = w.to(torch.float64)
        return self.forward(self.forward(w, "in").T, "out").T

    def rotate_hessian(self, h: torch.Tensor) -> torch.Tensor:
        """``H [n, n] -> U H U^T`` in float64 (symmetrized against rounding)."""
        h = self.forward(self.forward(h.to(torch.float64), "in").T, "in")
        return (h + h.T) / 2
