"""QuIP#: incoherence processing, BlockLDLQ over the E8P lattice codebook, and 3/4-bit residual stages.

Storage of an ``[m, n]`` weight (``m``, ``n`` multiples of 8):

- ``codes`` int16 ``[m, n / 8]``: E8P codes (the 16 bits read as unsigned) of the rotated, scaled weight;
- 3 bits: ``codes_residual`` uint8 ``[m, n / 8]`` (1-bit E8 codebook); 4 bits: int16 ``[m, n / 8]`` (E8P);
- ``su`` uint8 ``[n / 8]``, ``sv`` uint8 ``[m / 8]``: the random sign vectors, one bit per sign; with
  ``ft_steps`` or ``ft_e2e_steps`` > 0, float16 ``[n]`` and ``[m]``: the sign vectors relaxed to reals and
  tuned per decoder block (:mod:`.finetune`) and end to end (:mod:`.e2e`); format version 2, which still
  reads version 1's bits;
- ``scale`` float32 ``[1]``: ``RMS(W~) / opt_scale``;
- ``rot_in`` / ``rot_out`` float32 ``[K, K]``: only for a size with no Hadamard construction here.

``W = diag(SV) H_m^T (scale * decode(codes)) H_n diag(SU)``. Decoded codes are multiples of 1/4, so
:meth:`QuipSharpQuantizer.materialize` rotates them back in integer-valued float64 (exact with the +-1
Hadamard factors, whatever the order of the sums) and scales once: a block of rows is bit-identical to
the same rows of the whole. The fast path (:meth:`~QuipSharpQuantizer.matmul`) transforms the activations
instead and multiplies them by the decoded codes in row blocks.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import Field

from modulora_core import (
    BlockTune,
    Capabilities,
    CheckpointError,
    InvalidWeightError,
    ModelTune,
    PackedWeight,
    Quantizer,
    QuantizerConfig,
)

from . import hadamard, ldlq, rvq
from .e8p import gemv_native, to_int16
from .incoherence import Incoherence, pack_signs, unpack_signs

BLOCK = ldlq.BLOCK
DECODE_ELEMENTS = 1 << 20  # the fast path decodes about this many weights at a time (4 MiB in float32)

# ||W - Q(W)||_F / ||W||_F measured on the conformance kit's weights (64x128, 96x256, 256x64, std 0.02,
# its synthetic Hessian, 4 seeds): the worst of Gaussian and Student-t(3). LDLQ trades plain Frobenius
# error for Hessian-weighted error, so these exceed plain rounding's. Declared bounds are 1.25x these.
_MEASURED = {2: 0.353, 3: 0.208, 4: 0.113}
BOUND_MARGIN = 1.25
# RMS of the scaled rotated weight before rounding. The first candidate is the minimum of the rounding error
# of Gaussian 8-vectors (QuIP#'s 1.03 for E8P; measured here: flat over 0.95..1.0 for 3 bits, 0.93 for 4).
# With a Hessian the candidates compete on the proxy loss: on SmolLM2's first attention layer a smaller one
# (coarser grid, wider range) cuts the 2-bit proxy loss 7x, while most layers keep the first.
OPT_SCALES = {2: (1.03, 0.9, 0.8, 0.7), 3: (1.0, 0.9, 0.8, 0.7), 4: (0.93, 0.85, 0.77, 0.7)}


class QuipSharpConfig(QuantizerConfig):
    """QuIP# config: bit width (2: E8P; 3, 4: E8P + a residual stage) and the algorithm's knobs."""

    family = "quip#"
    bits: Literal[2, 3, 4] = Field(2, description="bits per weight: 2 (E8P), 3 (E8P + 1-bit E8), 4 (E8P + E8P)")
    damp: float = Field(0.01, ge=0, le=1, description="Hessian dampening, relative to its mean diagonal")
    opt_scale: float | None = Field(
        None, gt=0, description="RMS the rotated weight is scaled to before rounding; None: the best of a few "
        "candidates on the proxy loss (with BlockLDLQ), else the bit width's default"
    )
    ldlq: bool = Field(True, description="BlockLDLQ error feedback (needs calibration); False: plain rounding")
    seed: int = Field(0, ge=0, description="seed of the random sign vectors SU, SV (stored with the weight)")
    ft_steps: int = Field(0, ge=0, description="Adam steps per decoder block tuning the sign vectors (as reals, "
                          "stored float16) and the block's norms against the unquantized block's outputs on the "
                          "calibration tokens; 0: no fine-tuning stage (signs stored as bits)")
    ft_lr: float = Field(3e-3, gt=0, le=1, description="Adam learning rate of the fine-tuning stage")
    ft_norms: bool = Field(True, description="the fine-tuning stages also tune the vector parameters (norm "
                           "weights, biases), which the checkpoint stores dense")
    ft_e2e_steps: int = Field(0, ge=0, description="Adam steps of the end-to-end stage, once every block is "
                              "quantized: all sign vectors (as reals) and norms together, against the unquantized "
                              "model's next-token distribution on the calibration tokens (KL); 0: none")
    ft_e2e_lr: float = Field(1e-3, gt=0, le=1, description="Adam learning rate of the end-to-end stage")
    ft_e2e_batch: int = Field(4, ge=1, description="calibration sequences per step of the end-to-end stage")

    @property
    def real_signs(self) -> bool:
        """The sign vectors are stored as float16 reals (a fine-tuning stage tunes them), else as bits."""
        return bool(self.ft_steps or self.ft_e2e_steps)


FT_STEPS = 16  # the -ft presets' Adam steps per block (docs/benchmarks.md, quipsharp-quick-ft*)
# The -ft presets' end-to-end stage, per bit width. At 2 bits the calibration KL still fell ~20% per pass after
# 16 steps, so it runs 32; at 4 bits lr 1e-3 raised the KL in the first pass, so it runs at 3e-4
# (docs/benchmarks.md, quipsharp-quick-ft16-e2e*)
FT_E2E_STEPS = {2: 32, 3: 16, 4: 16}
FT_E2E_LR = {2: 1e-3, 3: 1e-3, 4: 3e-4}
PRESETS: dict[str, QuipSharpConfig] = {
    f"{name}-{b}bit{ft}": QuipSharpConfig(bits=b, ft_steps=FT_STEPS if ft else 0,
                                          ft_e2e_steps=FT_E2E_STEPS[b] if ft else 0, ft_e2e_lr=FT_E2E_LR[b])
    for name in ("quip#", "quipsharp") for b in (2, 3, 4) for ft in ("", "-ft")
}


def storage_spec(config: QuipSharpConfig, shape: tuple[int, int]) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """The packed tensors of a ``shape`` weight: ``{name: (dtype, shape)}``."""
    m, n = shape
    spec = {"codes": (torch.int16, (m, n // BLOCK)), "su": (torch.uint8, (n // 8,)), "sv": (torch.uint8, (m // 8,)),
            "scale": (torch.float32, (1,))}
    if config.real_signs:  # tuned sign vectors are real values
        spec["su"], spec["sv"] = (torch.float16, (n,)), (torch.float16, (m,))
    if config.bits == 3:
        spec["codes_residual"] = (torch.uint8, (m, n // BLOCK))
    elif config.bits == 4:
        spec["codes_residual"] = (torch.int16, (m, n // BLOCK))
    for side, size in (("rot_in", n), ("rot_out", m)):
        p = hadamard.plan(size)
        if p.random:
            spec[side] = (torch.float32, (p.k, p.k))
    return spec


class QuipSharpQuantizer(Quantizer):
    """QuIP# 2/3/4-bit (Tseng et al., ICML 2024), pure torch."""

    name = "quip#"
    config_class = QuipSharpConfig
    format_version = 2  # 2: float16 sign vectors when ft_steps > 0; version 1 (bits only) still loads

    def capabilities(self, config: QuipSharpConfig) -> Capabilities:
        bound = BOUND_MARGIN * _MEASURED[config.bits]
        return Capabilities(
            needs_calibration=config.ldlq,
            bits=config.bits,
            dtypes=("float32", "float16", "bfloat16", "float64"),
            row_chunking=False,  # a row block needs every row's codes (the output-side transform mixes them)
            fast_path=True,
            in_multiple=BLOCK,
            out_multiple=8,  # SV is stored one bit per sign, a byte per 8 rows
            max_relative_error=bound,
            max_relative_error_heavy_tailed=bound,  # incoherence makes heavy tails look Gaussian
            # the signs cost (m + n) bits and the scale 32: 0.028 bits/weight for 64 x 128, less beyond
            # float16 signs (ft_steps > 0): 16 (m + n) / (m n), 0.375 for 64 x 128, 0.06 for 576 x 576
            max_bits_per_weight=config.bits + (0.4 if config.real_signs else 0.03),
        )

    # -- quantize ------------------------------------------------------------------------------------------
    def quantize(self, weight: torch.Tensor, config: QuipSharpConfig, hessian: torch.Tensor | None = None) -> dict:
        """``[m, n]`` weight (+ ``[n, n]`` Hessian) -> codes, signs and scale (see the module docstring)."""
        m, n = weight.shape
        if n % BLOCK or m % 8:
            raise InvalidWeightError(f"quip#: weight shape {(m, n)} must have in_features a multiple of {BLOCK} "
                                     "and out_features a multiple of 8")
        if config.ldlq and hessian is None:
            raise InvalidWeightError("quip#: BlockLDLQ needs the input Hessian X^T X; pass calibration data, "
                                     "or use QuipSharpConfig(ldlq=False) for plain rounding")
        device, weight = weight.device, weight.detach()  # everything runs on the weight's device
        hessian = None if hessian is None else hessian.detach().to(device)
        inc = Incoherence.draw(m, n, config.seed, device)
        w_rot = inc.rotate_weight(weight)  # (m, n) float64
        rms = float(w_rot.square().mean().sqrt()) or 1.0  # an all-zero weight: any scale reproduces it
        opt_scales = (config.opt_scale,) if config.opt_scale else OPT_SCALES[config.bits]
        u = None
        if config.ldlq:
            h = inc.rotate_hessian(ldlq.damp_hessian(hessian, config.damp))
            u = ldlq.block_ldl(h)
            if len(opt_scales) > 1:  # judged on the first rows: H_m mixed all rows, any are typical
                cands = [float(torch.tensor(rms / o, dtype=torch.float32, device="cpu")) for o in opt_scales]
                best = ldlq.pick_scale(w_rot, h, u, cands, lambda x: rvq.quantize(x, config.bits)[1])
                opt_scales = (opt_scales[best],)
        scale = torch.tensor([rms / opt_scales[0]], dtype=torch.float32, device=device)
        first = torch.empty(m, n // BLOCK, dtype=torch.long, device=device)
        second = torch.empty(m, n // BLOCK, dtype=torch.long, device=device) if config.bits > 2 else None
        col = 0

        def quantize_block(x: torch.Tensor) -> torch.Tensor:  # (m, 8) -> (m, 8), recording the codes
            nonlocal col
            codes, recon = rvq.quantize(x, config.bits)
            first[:, col] = codes.first
            if second is not None:
                second[:, col] = codes.second
            col += 1
            return recon

        ldlq.block_ldlq((w_rot / float(scale)).to(torch.float32), u, quantize_block)
        return {"config": config, "shape": (m, n), "dtype": weight.dtype, "first": first, "second": second,
                "inc": inc, "scale": scale, "device": device}

    def pack(self, state: dict) -> PackedWeight:
        cfg: QuipSharpConfig = state["config"]
        inc: Incoherence = state["inc"]
        signs = (lambda v: v.to(torch.float16)) if cfg.real_signs else pack_signs  # noqa: E731
        tensors = {"codes": to_int16(state["first"]).contiguous(), "su": signs(inc.su),
                   "sv": signs(inc.sv), "scale": state["scale"].contiguous()}
        if cfg.bits == 3:
            tensors["codes_residual"] = state["second"].to(torch.uint8).contiguous()
        elif cfg.bits == 4:
            tensors["codes_residual"] = to_int16(state["second"]).contiguous()
        for key, rot in (("rot_in", inc.rot_in), ("rot_out", inc.rot_out)):
            if rot is not None:
                tensors[key] = rot.contiguous()
        device = state.get("device", "cpu")
        tensors = {k: v.to(device) for k, v in tensors.items()}
        return PackedWeight(self.name, cfg, state["shape"], state["dtype"], tensors, self.format_version)

    def packed_nbytes(self, shape: tuple[int, int], config: QuipSharpConfig) -> int:
        """Exact storage bytes of an ``(out, in)`` weight: the tensors of :func:`storage_spec`."""
        m, n = int(shape[0]), int(shape[1])
        if m < 8 or n < BLOCK or m % 8 or n % BLOCK:
            raise InvalidWeightError(f"quip#: cannot store a {(m, n)} weight: out must be a positive multiple "
                                     f"of 8 and in of {BLOCK}")
        return sum(math.prod(shp) * torch.empty(0, dtype=dt, device="meta").element_size()
                   for dt, shp in storage_spec(config, (m, n)).values())

    def unpack(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> PackedWeight:
        packed = super().unpack(tensors, metadata)
        if packed.format_version == 1:  # before the fine-tuning stage: signs as bits, whatever ft_steps defaults to
            packed.config = packed.config.model_copy(update={"ft_steps": 0, "ft_e2e_steps": 0})
            packed.format_version = self.format_version
        if packed.format_version != self.format_version:
            raise CheckpointError(f"quip# packed weight has format_version {packed.format_version}; this plugin "
                                  f"reads {self.format_version}")
        want = storage_spec(packed.config, packed.shape)
        if set(packed.tensors) != set(want):
            raise CheckpointError(f"quip# packed weight {packed.shape} has tensors {sorted(packed.tensors)}; "
                                  f"expected {sorted(want)} for {packed.config.to_json()}")
        for key, (dtype, shp) in want.items():
            t = packed.tensors[key]
            if t.dtype != dtype or tuple(t.shape) != shp:
                raise CheckpointError(f"quip# packed tensor {key!r} of a {packed.shape} weight is {t.dtype} "
                                      f"{tuple(t.shape)}; expected {dtype} {shp}")
        return packed

    def block_tuner(self, config: QuipSharpConfig) -> BlockTune | None:
        """QuIP#'s fine-tuning stage for the calibration pipeline (:func:`.finetune.tune_block`), or None
        when ``config.ft_steps`` is 0."""
        if not config.ft_steps:
            return None
        from .finetune import tune_block

        return lambda block, names, run, targets: tune_block(block, names, run, targets, config, self)

    def model_tuner(self, config: QuipSharpConfig) -> ModelTune | None:
        """QuIP#'s end-to-end stage for the calibration pipeline (:func:`.e2e.tune_model`), or None when
        ``config.ft_e2e_steps`` is 0."""
        if not config.ft_e2e_steps:
            return None
        from .e2e import tune_model

        return lambda model, names, tokens, teacher: tune_model(model, names, tokens, teacher, config, self)

    # -- reading the storage -------------------------------------------------------------------------------
    @staticmethod
    def incoherence(packed: PackedWeight, device: torch.device | str | None = None) -> Incoherence:
        """The stored signs (and random factors) as an :class:`Incoherence`, on ``device``."""
        t = packed.tensors
        dev = device if device is not None else packed.device
        su, sv = (unpack_signs(t[k].to(dev)) for k in ("su", "sv"))
        rot_in, rot_out = (t[k].to(dev) if k in t else None for k in ("rot_in", "rot_out"))
        return Incoherence(su, sv, rot_in, rot_out)

    @staticmethod
    def _codes(packed: PackedWeight, rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        t = packed.tensors
        r = rows if rows is not None else slice(None)
        second = t.get("codes_residual")
        return t["codes"][r], None if second is None else second[r]

    def decoded(self, packed: PackedWeight, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` of the rotated weight ``W~ / scale`` (the decoded codes) as ``[r, n]`` in ``dtype``."""
        first, second = self._codes(packed, rows)
        return rvq.decode(first, second, packed.config.bits, dtype).reshape(first.shape[0], -1)

    # -- materialize -------------------------------------------------------------------------------------
    def materialize(self, packed: PackedWeight, *, dtype: torch.dtype, device: torch.device | str | None = None,
                    rows: slice | None = None) -> torch.Tensor:
        """Dense ``[m, n]`` weight, or ``[len(rows), n]``; computed exactly in float64, then cast.

        The generic path: it takes a few float64 copies of the weight (the layer itself runs on the fast
        path, :meth:`matmul`), and a block of rows still decodes every row (the output side mixes them).
        2 bits on a CPU: the C kernel instead, float32 transforms of the integer-valued codewords (exact while
        the sums stay below 2^22 quarter units, as they do for real weights) and one rounding of the product
        with the float64 scale: the same floats as the float64 path.
        """
        m, n = packed.shape
        a, b, step = (rows or slice(None)).indices(m)
        if step != 1:
            raise InvalidWeightError(f"quip#: row blocks must be contiguous (step 1), got step {step}")
        b = max(a, b)
        p_in, p_out = hadamard.plan(n), hadamard.plan(m)
        t = packed.tensors
        if packed.config.bits == 2 and dtype != torch.float64 and device in (None, t["codes"].device):
            # the CPU kernel: float32 transforms (exact: integer-valued sums), one float64 rounding at the end
            c = t["scale"].to(torch.float64) * (p_in.norm * p_out.norm)  # codewords, not 4x: divisor 1
            w = hadamard.materialize_2bit_native(t["codes"], t.get("rot_in"), t.get("rot_out"),
                                                 unpack_signs(t["sv"], torch.float64) * c,
                                                 unpack_signs(t["su"], torch.float64))
            if w is not None:
                w = w if (a, b) == (0, m) else w[a:b].clone()
                return w if dtype == torch.float32 else w.to(dtype)
        first, second = self._codes(packed)
        k, divisor = rvq.integer_sum(first, second, packed.config.bits)  # (m, n/8, 8) integer-valued float64
        mats_in = hadamard.factors_on(p_in, t.get("rot_in"), torch.float64, k.device)
        z = hadamard.kron_apply(k.reshape(m, n), mats_in, transpose=True)  # K H_n
        del k  # one float64 copy of the weight fewer while the output side runs
        out_mats = hadamard.factors_on(p_out, t.get("rot_out"), torch.float64, z.device)
        if (b - a) < sum(p_out.factors) and not (p_in.random or p_out.random):
            # a few rows: those rows of H_m^T times K H_n (exact, so equal to slicing the whole)
            h_rows = hadamard.kron_apply(torch.eye(m, dtype=torch.float64, device=z.device)[a:b], out_mats)
            y = h_rows @ z
        else:
            y = hadamard.kron_apply(z.T.contiguous(), out_mats, transpose=True).T[a:b]  # H_m^T K H_n
        # the scale stays a tensor: float() of it would sync the host
        c = t["scale"].to(torch.float64) * (p_in.norm * p_out.norm / divisor)
        signs_in = unpack_signs(t["su"], torch.float64).to(y.device)
        row_factor = unpack_signs(t["sv"], torch.float64).to(y.device)[a:b] * c  # exact: c times +-1
        w = y.mul_(row_factor[:, None]).mul_(signs_in[None, :])  # in place: y is ours alone
        return w.to(dtype=dtype, device=device if device is not None else y.device)

    # -- fast path ---------------------------------------------------------------------------------------
    @staticmethod
    def _work_dtype(x: torch.Tensor) -> torch.dtype:
        # float16/bfloat16 Hadamard sums of hundreds of terms lose too much: transform in float32 then
        return x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32

    def _row_blocks(self, packed: PackedWeight) -> range:
        m, n = packed.shape
        step = max(BLOCK, (DECODE_ELEMENTS // n) // BLOCK * BLOCK)
        return range(0, m, step)

    def matmul(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        """``[..., n] -> [..., m]`` = ``x @ W^T``: rotate x, multiply by decoded row blocks, rotate back."""
        m, n = packed.shape
        dt = self._work_dtype(x)
        inc = self.incoherence(packed, x.device)
        x1 = inc.forward(x.to(dt), "in").reshape(-1, n)  # (N, n): x U^T
        # a decode step (a few rows, 2 bits) on a CPU: codebook lookups dotted with x1, no decoded rows at all
        y = gemv_native(x1, packed.tensors["codes"]) if packed.config.bits == 2 else None
        if y is None:
            y = x1.new_empty(x1.shape[0], m)
            rows = self._row_blocks(packed)
            for a in rows:
                b = min(a + rows.step, m)
                y[:, a:b] = x1 @ self.decoded(packed, slice(a, b), dt).T
        y *= packed.tensors["scale"].to(dt)  # a [1] tensor on the device: float() would sync the host
        return inc.backward(y, "out").reshape(*x.shape[:-1], m).to(x.dtype)  # (..., m): y V

    def matmul_T(self, grad_y: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        """``[..., m] -> [..., n]`` = ``grad_y @ W``, the same way round."""
        m, n = packed.shape
        dt = self._work_dtype(grad_y)
        inc = self.incoherence(packed, grad_y.device)
        g1 = inc.forward(grad_y.to(dt), "out").reshape(-1, m)  # (N, m): grad_y V^T
        g2 = g1.new_zeros(g1.shape[0], n)
        rows = self._row_blocks(packed)
        for a in rows:
            b = min(a + rows.step, m)
            g2.addmm_(g1[:, a:b], self.decoded(packed, slice(a, b), dt))
        g2 *= packed.tensors["scale"].to(dt)
        return inc.backward(g2, "in").reshape(*grad_y.shape[:-1], n).to(grad_y.dtype)  # (..., n): g U


def bits_per_weight(config: QuipSharpConfig, shape: tuple[int, int]) -> float:
    """Storage bits per weight of a ``shape`` weight, every tensor counted."""
    return 8 * QuipSharpQuantizer().packed_nbytes(shape, config) / (shape[0] * shape[1])
