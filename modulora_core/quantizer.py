"""The Quantizer protocol every plugin implements.

A quantizer *family* (``rtn``, ``nf4``, ``optq``, ...) is a stateless class with a pydantic config. It turns
one dense ``[out, in]`` weight into a :class:`PackedWeight` (plain tensors + metadata) and turns that back
into dense weights on demand, whole or by blocks of rows. The core never looks inside the packed tensors.
"""

from __future__ import annotations

import json
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidWeightError, QuantizerConfigError

# A quantizer's tuning of one decoder block after calibration quantized its linears, in place:
# (block, names of its quantized linears relative to the block, run, targets), where run(j) is the block's
# output [b, t, d] on calibration batch j (autograd is up to the tuner) and targets[j] the unquantized
# block's output on the same inputs.
BlockTune = Callable[[Any, list[str], Callable[[int], torch.Tensor], list[torch.Tensor]], None]
# A quantizer's tuning of the whole model once calibration quantized every targeted linear, in place:
# (model, names of its quantized linears, calibration tokens [n, t], teacher [n, t, d]), where teacher is what
# the unquantized model fed its output layer (lm_head) on those tokens, captured before quantization began.
ModelTune = Callable[[Any, list[str], torch.Tensor, torch.Tensor], Any]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    """``"float16"`` -> ``torch.float16``; a clear error for anything else."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise InvalidWeightError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


class QuantizerConfig(BaseModel):
    """Base of every plugin's config. Subclasses add fields (``bits``, ``group_size``, ...).

    ``family`` names the quantizer family the config belongs to; it is how a config object alone finds its
    plugin (``modulora.get_preset(RTNConfig(bits=3))``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    family: ClassVar[str] = ""

    def to_json(self) -> str:
        """The config as JSON, with its family, for checkpoint metadata."""
        return json.dumps({"family": self.family, **self.model_dump(mode="json")}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict[str, Any]) -> QuantizerConfig:
        """Inverse of :meth:`to_json`; a pydantic error becomes a :class:`QuantizerConfigError`."""
        data = dict(json.loads(text) if isinstance(text, str) else text)
        fam = data.pop("family", cls.family)
        if fam != cls.family:
            raise QuantizerConfigError(f"config is for quantizer family {fam!r}, not {cls.family!r}")
        return validate_config(cls, data)


def validate_config(cls: type[QuantizerConfig], data: dict[str, Any]) -> QuantizerConfig:
    """Build ``cls(**data)``, turning pydantic's message (which names the field) into our error type."""
    try:
        return cls(**data)
    except ValidationError as e:
        raise QuantizerConfigError(f"invalid {cls.__name__} for quantizer {cls.family!r}:\n{e}") from e


class Capabilities(BaseModel):
    """What a plugin can do with one config; the conformance kit reads it to decide what to check."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    needs_calibration: bool = Field(False, description="quantize() needs the input Hessian X^T X")
    bits: int = Field(description="nominal bits per weight of the codes")
    dtypes: tuple[str, ...] = Field(
        ("float32", "float16", "bfloat16"), description="dtypes materialize() can produce"
    )
    row_chunking: bool = Field(True, description="materialize(rows=slice) returns a block of rows cheaply")
    fast_path: bool = Field(False, description="matmul/matmul_T multiply without a dense weight")
    in_multiple: int = Field(1, ge=1, description="in_features must be a multiple of this")
    out_multiple: int = Field(1, ge=1, description="out_features must be a multiple of this")
    max_relative_error: float = Field(
        description="declared bound on ||W - Q(W)||_F / ||W||_F for a Gaussian weight"
    )
    max_relative_error_heavy_tailed: float | None = Field(
        None, description="bound for a heavy-tailed (Student-t, 3 dof) weight; None: 2x the Gaussian bound"
    )
    max_bits_per_weight: float = Field(description="budget for packed storage bits per weight, all overhead")
    deterministic: bool = Field(True, description="same weight + seed gives the same packed tensors")


@dataclass
class PackedWeight:
    """A quantized ``[out, in]`` weight: plain tensors (safetensors-ready) plus what is needed to read them.

    ``tensors`` hold the quantizer's storage (codes, scales, ...), never a Parameter. ``family`` is the
    quantizer family's name, ``shape`` the dense ``(out, in)``, ``dtype`` the original weight's dtype.
    """

    family: str
    config: QuantizerConfig
    shape: tuple[int, int]
    dtype: torch.dtype
    tensors: dict[str, torch.Tensor]
    format_version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def device(self) -> torch.device:
        return next(iter(self.tensors.values())).device

    def nbytes(self) -> int:
        """Bytes of packed storage (all tensors)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_weight(self) -> float:
        """Storage bits per weight, every tensor of overhead included."""
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])

    def to(self, device: torch.device | str) -> PackedWeight:
        """A copy whose tensors live on ``device``."""
        moved = {k: v.to(device) for k, v in self.tensors.items()}
        return PackedWeight(self.family, self.config, self.shape, self.dtype, moved, self.format_version,
                            dict(self.extra))

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description (everything but the tensors)."""
        return {
            "family": self.family,
            "config": json.loads(self.config.to_json()),
            "shape": list(self.shape),
            "dtype": dtype_name(self.dtype),
            "format_version": self.format_version,
            "extra": self.extra,
        }


def _rows_range(rows: slice | None, n: int) -> tuple[int, int]:
    """Normalize a row block to ``(start, stop)``; only contiguous, step-1 blocks are meaningful."""
    if rows is None:
        return 0, n
    start, stop, step = rows.indices(n)
    if step != 1:
        raise InvalidWeightError(f"row blocks must be contiguous (step 1), got step {step}")
    return start, max(start, stop)


class Quantizer(ABC):
    """A quantizer family. Stateless: everything a call needs comes in its arguments.

    Subclasses set ``name`` (the family, e.g. ``"rtn"``), ``config_class`` and ``format_version``, and
    implement :meth:`capabilities`, :meth:`quantize`, :meth:`pack` and :meth:`materialize`.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[QuantizerConfig]]
    format_version: ClassVar[int] = 1

    # -- required -------------------------------------------------------------------------------------
    @abstractmethod
    def capabilities(self, config: QuantizerConfig) -> Capabilities:
        """What this family can do with ``config`` (bits, bounds, shape constraints, ...)."""

    @abstractmethod
    def quantize(self, weight: torch.Tensor, config: QuantizerConfig, hessian: torch.Tensor | None = None) -> Any:
        """Run the algorithm on one ``[out, in]`` float weight; returns a plugin-defined state for :meth:`pack`.

        ``hessian`` is ``[in, in]`` ``X^T X`` of the layer's calibration inputs when
        ``capabilities(config).needs_calibration``.
        """

    @abstractmethod
    def pack(self, state: Any) -> PackedWeight:
        """Compact storage for the state :meth:`quantize` returned."""

    @abstractmethod
    def materialize(
        self, packed: PackedWeight, *, dtype: torch.dtype, device: torch.device | str | None = None,
        rows: slice | None = None,
    ) -> torch.Tensor:
        """Dense ``[out, in]`` weight, or ``[len(rows), in]`` for a block of rows ``rows``."""

    # -- optional -------------------------------------------------------------------------------------
    def materialize_T(
        self, packed: PackedWeight, *, dtype: torch.dtype, device: torch.device | str | None = None,
        cols: slice | None = None,
    ) -> torch.Tensor:
        """Dense ``[in, out]`` transpose, or its block of columns ``cols`` (= rows of W) as ``[in, len]``."""
        return self.materialize(packed, dtype=dtype, device=device, rows=cols).T

    def matmul(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        """Fast path ``x @ W^T``: ``[..., in] -> [..., out]``, without a dense W. Only if capabilities say so."""
        raise NotImplementedError(f"quantizer {self.name!r} has no fast path (matmul)")

    def matmul_T(self, grad_y: torch.Tensor, packed: PackedWeight) -> torch.Tensor:
        """Fast path ``grad_y @ W``: ``[..., out] -> [..., in]``, without a dense W."""
        raise NotImplementedError(f"quantizer {self.name!r} has no fast path (matmul_T)")

    def matmul_small(self, x: torch.Tensor, packed: PackedWeight) -> torch.Tensor | None:
        """Decode path: ``x @ W^T`` for an ``[N, in]`` x of a few rows (``N <= SMALL_BATCH``: one generated
        token per sequence) straight from the packed form, without a dense W; ``[N, out]`` in x's dtype.

        None (the default) means "not for this weight": the caller materializes instead.
        """
        return None

    def block_tuner(self, config: QuantizerConfig) -> BlockTune | None:
        """A tuning stage run on each decoder block once calibration quantized its linears (QuIP#'s
        fine-tuning); None (the default): none."""
        return None

    def model_tuner(self, config: QuantizerConfig) -> ModelTune | None:
        """A tuning stage run on the whole model once calibration quantized all its targeted linears, against
        the unquantized model's outputs (QuIP#'s end-to-end fine-tuning); None (the default): none."""
        return None

    def packed_nbytes(self, shape: tuple[int, int], config: QuantizerConfig) -> int:
        """Exact bytes of the packed storage of an ``(out, in)`` weight, without the weight (memory planner).

        The default runs :meth:`quantize` + :meth:`pack` on the meta device: only shapes are computed, and a
        storage whose size depended on the values could not run there (``.item()``, ``nonzero`` raise on
        meta), so a result is exact. If the plugin cannot run on meta, it quantizes a random weight of the
        true shape instead: exact too, but as slow as a real quantization. Override it with a formula when
        the layout has one.
        """
        out_f, in_f = int(shape[0]), int(shape[1])
        caps = self.capabilities(config)
        if out_f < 1 or in_f < 1 or in_f % caps.in_multiple or out_f % caps.out_multiple:
            raise InvalidWeightError(
                f"{self.name}: cannot store a ({out_f}, {in_f}) weight with this config: out must be a positive "
                f"multiple of {caps.out_multiple} and in of {caps.in_multiple}")
        hessian = None
        try:
            w = torch.empty(out_f, in_f, device="meta")
            if caps.needs_calibration:
                hessian = torch.empty(in_f, in_f, device="meta")
            return self.pack(self.quantize(w, config, hessian)).nbytes()
        except Exception:  # noqa: BLE001 - any op without a meta kernel: measure on a real weight instead
            pass
        if out_f * in_f > 50_000_000:
            warnings.warn(f"quantizer {self.name!r} defines no packed_nbytes and cannot run on the meta device: "
                          f"quantizing a random {out_f}x{in_f} weight to learn its storage size (slow)",
                          stacklevel=2)
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(out_f, in_f, generator=gen)
        hessian = torch.eye(in_f) if caps.needs_calibration else None
        return self.quantize_weight(w, config, hessian).nbytes()

    def unpack(self, tensors: dict[str, torch.Tensor], metadata: dict[str, Any]) -> PackedWeight:
        """Rebuild a :class:`PackedWeight` from saved tensors + :meth:`PackedWeight.metadata`."""
        return PackedWeight(
            # "quantizer" is what modulora 0.1 wrote for the family
            family=metadata.get("family", metadata.get("quantizer")),
            config=self.config_class.from_json(metadata["config"]),
            shape=(int(metadata["shape"][0]), int(metadata["shape"][1])),
            dtype=dtype_from_name(metadata["dtype"]),
            tensors=dict(tensors),
            format_version=int(metadata["format_version"]),
            extra=dict(metadata.get("extra", {})),
        )

    # -- the entry point the core uses: validate, then quantize + pack ----------------------------------
    def quantize_weight(
        self, weight: torch.Tensor, config: QuantizerConfig, hessian: torch.Tensor | None = None
    ) -> PackedWeight:
        """Validate ``weight`` (and ``hessian``) against the capabilities, then quantize and pack."""
        if not isinstance(config, self.config_class):
            raise QuantizerConfigError(
                f"quantizer {self.name!r} takes a {self.config_class.__name__}, got {type(config).__name__}"
            )
        caps = self.capabilities(config)
        check_weight(weight, caps, quantizer=self.name)
        if caps.needs_calibration:
            if hessian is None:
                raise InvalidWeightError(
                    f"quantizer {self.name!r} needs calibration: pass the input Hessian X^T X "
                    f"(modulora.load(..., calibration=...))"
                )
        if hessian is not None:
            check_hessian(hessian, weight.shape[1], quantizer=self.name)
        packed = self.pack(self.quantize(weight, config, hessian))
        if tuple(packed.shape) != tuple(weight.shape):
            raise InvalidWeightError(f"quantizer {self.name!r} packed shape {packed.shape}, expected {weight.shape}")
        return packed


def check_weight(weight: torch.Tensor, caps: Capabilities, *, quantizer: str) -> None:
    """Raise :class:`InvalidWeightError` unless ``weight`` is a finite floating ``[out, in]`` tensor that
    meets the shape constraints in ``caps``."""
    if not isinstance(weight, torch.Tensor):
        raise InvalidWeightError(f"{quantizer}: weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise InvalidWeightError(f"{quantizer}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise InvalidWeightError(f"{quantizer}: weight must be floating point, got {weight.dtype}")
    if weight.device.type == "meta":
        raise InvalidWeightError(f"{quantizer}: weight is on the meta device (not loaded); load real weights first")
    out_f, in_f = weight.shape
    if out_f == 0 or in_f == 0:
        raise InvalidWeightError(f"{quantizer}: weight is empty, shape {tuple(weight.shape)}")
    if in_f % caps.in_multiple:
        raise InvalidWeightError(
            f"{quantizer}: in_features={in_f} must be a multiple of {caps.in_multiple} for this config"
        )
    if out_f % caps.out_multiple:
        raise InvalidWeightError(
            f"{quantizer}: out_features={out_f} must be a multiple of {caps.out_multiple} for this config"
        )
    if not bool(torch.isfinite(weight).all()):
        n_bad = int((~torch.isfinite(weight)).sum())
        raise InvalidWeightError(f"{quantizer}: weight has {n_bad} NaN/inf values; quantize a finite weight")


def check_hessian(hessian: torch.Tensor, in_features: int, *, quantizer: str) -> None:
    """Raise unless ``hessian`` is a finite ``[in, in]`` float matrix."""
    if hessian.shape != (in_features, in_features):
        raise InvalidWeightError(
            f"{quantizer}: Hessian must be [{in_features}, {in_features}], got {tuple(hessian.shape)}"
        )
    if not bool(torch.isfinite(hessian).all()):
        raise InvalidWeightError(f"{quantizer}: Hessian has NaN/inf values; check the calibration data")
