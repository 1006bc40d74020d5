"""The HQQ config: hqq's own quantization settings and the settings of its half-quadratic solver."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from modulora_core import QuantizerConfig

# hqq 0.2.8's defaults for ``optimize_weights_proximal`` (the solver ``Quantizer.quantize`` runs)
HQQ_DEFAULT_OPT_PARAMS = {"lp_norm": 0.7, "beta": 1e1, "kappa": 1.01, "iters": 20}
SUPPORTED_BITS = (1, 2, 3, 4, 8)


class HQQConfig(QuantizerConfig):
    """Half-Quadratic Quantization (Badri & Shaji, 2023) through the hqq library; no calibration data."""

    family = "hqq"
    bits: int = Field(4, description="bits per weight code: 1, 2, 3, 4 or 8 (hqq's nbits)")
    group_size: int = Field(
        64, description="weights per scale/zero point, a multiple of 8; -1: one group per row (axis=1) "
        "or per column (axis=0), hqq's group_size=None")
    axis: Literal[0, 1] = Field(
        1, description="hqq's grouping axis. 1: a group is group_size consecutive inputs of one row "
        "(row blocks materialize cheaply); 0: the weight is reshaped to [group_size, -1] and each column of "
        "that is a group (row blocks need the whole weight)")
    optimize: bool = Field(
        True, description="run HQQ's half-quadratic solver for the zero points; False: min/max rounding")
    round_zero: bool | None = Field(
        None, description="round zero points to integers; None: hqq's BaseQuantizeConfig default (True for "
        "4-bit only)")
    lp_norm: float = Field(
        HQQ_DEFAULT_OPT_PARAMS["lp_norm"], gt=0, le=1,
        description="p of the l_p error norm the solver minimizes; p < 1 makes it robust to outliers")
    beta: float = Field(
        HQQ_DEFAULT_OPT_PARAMS["beta"], gt=0,
        description="weight of the quadratic coupling term of the half-quadratic splitting")
    kappa: float = Field(
        HQQ_DEFAULT_OPT_PARAMS["kappa"], ge=1,
        description="growth of beta per iteration; hqq 0.2.8's default solver takes it but keeps beta fixed, "
        "so it has no effect there")
    iters: int = Field(
        HQQ_DEFAULT_OPT_PARAMS["iters"], ge=1,
        description="most solver iterations; it stops earlier once the mean absolute error stops falling")
    meta_dtype: Literal["float16", "float32"] = Field(
        "float16", description="dtype of the stored scales and zero points (hqq's compute_dtype casts them): "
        "float16 as hqq stores them on GPU, 32 bits per group; float32 doubles that")

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        if v not in SUPPORTED_BITS:
            raise ValueError(
                f"bits={v} is not supported; use one of {SUPPORTED_BITS} (hqq keeps 5- and 6-bit codes "
                "unpacked in 8 bits and 1.58-bit in 2, so those would save nothing over 8 or 2)")
        return v

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and (v < 8 or v % 8):
            raise ValueError(f"group_size={v}: hqq needs a multiple of 8 (e.g. 64), or -1 for whole rows")
        return v

    def opt_params(self) -> dict[str, float]:
        """The solver's settings in hqq's ``opt_params`` form."""
        return {"lp_norm": self.lp_norm, "beta": self.beta, "kappa": self.kappa, "iters": self.iters}

    def resolved_round_zero(self) -> bool:
        """``round_zero`` with None resolved the way hqq's ``BaseQuantizeConfig`` does."""
        return self.bits == 4 if self.round_zero is None else self.round_zero

    def effective_group_size(self, shape: tuple[int, int]) -> int:
        """Group size for a ``(out, in)`` weight: -1 becomes the whole row (axis 1) or column (axis 0)."""
        if self.group_size != -1:
            return self.group_size
        return shape[1] if self.axis == 1 else shape[0]
