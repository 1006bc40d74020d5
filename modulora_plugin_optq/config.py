"""OPTQConfig, the presets, and the mapping to and from a GPTQ ``quantize_config``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from modulora_core import CheckpointError, QuantizerConfig, QuantizerConfigError

from .packing import BITS

GROUP_SIZES = (-1, 16, 32, 64, 128, 256, 512, 1024)  # what GPTQ checkpoints and GPTQModel's kernels use


class OPTQConfig(QuantizerConfig):
    """OPTQ / GPTQ: bits, group size, symmetric or asymmetric, act-order, dampening, block size."""

    family = "optq"
    bits: Literal[2, 3, 4, 8] = Field(4, description=f"bits per weight code; one of {BITS}")
    group_size: int = Field(
        128, description=f"input columns per scale/zero; -1: one group per row; one of {GROUP_SIZES}. An "
        "input dimension it does not divide gets a smaller last group, as in GPTQ checkpoints")
    sym: bool = Field(True, description="symmetric (zero fixed at 2^(bits-1)) instead of min-max asymmetric")
    desc_act: bool = Field(
        False, description="act-order: quantize input columns by descending Hessian diagonal")
    act_group_aware: bool = Field(
        True, description="group-aware reordering (GPTQModel's default): with act-order off and groups, quantize "
        "whole groups by importance and each group's columns by descending Hessian diagonal; g_idx stays "
        "i // group_size. Act-order, when on, sets the order instead")
    mse: float = Field(
        2.4, ge=0, le=8, description="clipping search: 0 off (min-max ranges); else the norm exponent p (2.4 "
        "as in GPTQ's code): each group's range is shrunk to the factor in 1, 0.99, ..., 0.21 with the "
        "smallest sum |w - q|^p per row, as GPTQModel's `mse` (off by default there)")
    static_groups: bool = Field(
        False, description="fix every group's scale/zero from the original weight first (with act-order "
        "this keeps g_idx monotonic)")
    damp_percent: float = Field(0.05, gt=0, lt=1, description="dampening: this fraction of mean(diag H) is "
                                "added to the Hessian's diagonal (5%, GPTQModel's default)")
    block_size: int = Field(128, ge=1, le=4096, description="columns per lazy-batch update block")

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v not in GROUP_SIZES:
            raise ValueError(f"group_size must be one of {GROUP_SIZES} (-1: one group per row), got {v}")
        return v


# Chosen by held-out perplexity against bits per weight (benchmarks/bench_optq_presets.py, docs/benchmarks.md):
# GPTQ v1 stores a zero point per group either way, so asymmetric grids cost no storage and measured better
# (3 bits, group 64: 24.8 against 27.0; 4 bits, group 128: 20.4 against 21.2); 3 bits pays 0.14 bit per
# weight for groups of 64 (27.0 against 29.7, symmetric). 2 bits keeps group 128 (not measured with these
# defaults), so its storage is unchanged.
PRESETS: dict[str, OPTQConfig] = {
    "optq-2bit": OPTQConfig(bits=2, sym=False),
    "optq-3bit": OPTQConfig(bits=3, sym=False, group_size=64),
    "optq-4bit": OPTQConfig(bits=4, sym=False),
    "optq-8bit": OPTQConfig(bits=8),
}


def preset_name(config: OPTQConfig) -> str:
    """The preset whose config equals ``config``, else the family name ``"optq"``."""
    return next((name for name, cfg in PRESETS.items() if cfg == config), OPTQConfig.family)


def to_gptq_config(config: OPTQConfig, *, lm_head: bool = False, version: str = "unknown") -> dict[str, Any]:
    """The ``quantization_config`` of a GPTQ v1 checkpoint (``config.json`` / ``quantize_config.json``)."""
    return {
        "quant_method": "gptq", "method": "gptq", "checkpoint_format": "gptq", "format": "gptq",
        "bits": config.bits, "group_size": config.group_size, "desc_act": config.desc_act, "sym": config.sym,
        "static_groups": config.static_groups, "damp_percent": config.damp_percent, "true_sequential": True,
        "pack_dtype": "int32", "lm_head": lm_head,
        "meta": {"quantizer": [f"modulora-optq:{version}"], "damp_percent": config.damp_percent,
                 "static_groups": config.static_groups, "mse": config.mse,
                 "act_group_aware": config.act_group_aware and not config.desc_act and config.group_size > 0},
    }


def from_gptq_config(qc: dict[str, Any], where: str) -> tuple[OPTQConfig, int]:
    """``(OPTQConfig, qzeros version 1 or 2)`` of a GPTQ checkpoint's quantization config."""
    method = str(qc.get("quant_method") or qc.get("method") or "gptq").lower()
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if method != "gptq" or fmt not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"{where}: quant_method {method!r} / checkpoint_format {fmt!r}; the optq plugin "
                              "reads quant_method 'gptq' with checkpoint_format 'gptq' or 'gptq_v2'")
    if str(qc.get("pack_dtype", "int32")).removeprefix("torch.") != "int32":
        raise CheckpointError(f"{where}: pack_dtype {qc.get('pack_dtype')!r}; GPTQ checkpoints the optq plugin "
                              "reads pack codes in int32")
    meta = qc.get("meta") if isinstance(qc.get("meta"), dict) else {}
    if qc.get("dynamic"):
        raise CheckpointError(f"{where}: per-module `dynamic` overrides are not supported; every module must "
                              "share one bits/group_size")
    desc_act, group = bool(qc.get("desc_act", False)), int(qc.get("group_size", 128))
    # the order GPTQ used does not change how the weights decode; where it could not apply, keep our default
    gar = bool(meta.get("act_group_aware", True)) or desc_act or group <= 0
    try:
        cfg = OPTQConfig(
            bits=int(qc.get("bits", 4)), group_size=group, sym=bool(qc.get("sym", True)), desc_act=desc_act,
            static_groups=bool(qc.get("static_groups", meta.get("static_groups", False))),
            damp_percent=float(qc.get("damp_percent", meta.get("damp_percent", 0.01))),
            act_group_aware=gar, mse=float(meta.get("mse", OPTQConfig.model_fields["mse"].default)),
        )
    except (ValueError, QuantizerConfigError) as e:
        raise CheckpointError(f"{where}: GPTQ settings the optq plugin cannot read: {e}") from e
    return cfg, 2 if fmt == "gptq_v2" else 1
