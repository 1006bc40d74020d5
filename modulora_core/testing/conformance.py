"""The conformance kit: a pytest base class that checks one quantizer preset against the protocol.

A plugin author writes::

    from modulora_core.testing import QuantizerConformance

    class TestMine(QuantizerConformance):
        preset = "mine-3bit"

and runs pytest. The test method names below are public API (select them with ``-k``); class attributes are
the knobs. Checks that a preset's :class:`~modulora_core.Capabilities` rule out are skipped with a reason.
Every failure message names the protocol method at fault and what was expected of it.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import pytest
import torch

from ..errors import InvalidWeightError, QuantizerConfigError
from ..quantizer import Capabilities, PackedWeight, dtype_from_name
from ..registry import Preset
from .autograd_checks import AutogradChecks
from .device_checks import DeviceChecks
from .support import WeightCase, max_abs_diff, require, resolve_preset, who
from .weights import fit_shape, gaussian_weight, relative_error, student_t_weight, synthetic_hessian

PACKED_METADATA_KEY = "modulora.packed"


class QuantizerConformance(AutogradChecks, DeviceChecks):
    """Subclass it, set ``preset``, and pytest runs every conformance check on that preset.

    ``preset`` may be a preset or family name (``"rtn-4bit"``), a config object (``RTNConfig(bits=3)``),
    or a :class:`~modulora_core.registry.Preset` for a quantizer that is not installed.
    """

    preset: ClassVar[Any] = None
    # -- knobs ------------------------------------------------------------------------------------------
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((64, 128), (96, 256), (256, 64))  # wide, wide, tall
    seed: ClassVar[int] = 0
    weight_std: ClassVar[float] = 0.02
    atol: ClassVar[float] = 0.0  # for checks that must be bit-exact (transpose, row blocks, round trip)
    block_sizes: ClassVar[tuple[int, ...]] = (5, 16, 48)  # row/column blocks; 5 and 48 leave ragged ends
    error_bound_slack: ClassVar[float] = 1.0  # multiplies the declared error bounds
    low_precision_rtol: ClassVar[float] = 1e-2  # float16/bfloat16 materialize vs float32, relative to max|W|
    devices: ClassVar[tuple[str, ...] | None] = None  # None: cpu, plus cuda when available
    invalid_configs: ClassVar[tuple[dict[str, Any], ...] | None] = None  # None: unknown field, bits=99

    # -- fixtures ---------------------------------------------------------------------------------------
    @pytest.fixture(scope="class")
    @classmethod
    def bound_preset(cls) -> Preset:
        return resolve_preset(cls.preset, cls.__name__)

    @pytest.fixture(scope="class")
    @classmethod
    def capabilities(cls, bound_preset: Preset) -> Capabilities:
        caps = bound_preset.capabilities()
        require(isinstance(caps, Capabilities),
                f"{who(bound_preset, 'capabilities')} returned {type(caps).__name__}, expected Capabilities")
        return caps

    @pytest.fixture(scope="class")
    @classmethod
    def weight_cases(cls, bound_preset: Preset, capabilities: Capabilities) -> list[WeightCase]:
        """Every shape (fitted to the preset's multiples) x {Gaussian, Student-t(3)}, quantized once."""
        cases = []
        for i, raw in enumerate(cls.shapes):
            shape = fit_shape(raw, capabilities.out_multiple, capabilities.in_multiple)
            for k, (kind, make) in enumerate((("gaussian", gaussian_weight), ("student_t", student_t_weight))):
                seed = cls.seed * 1000 + 2 * i + k
                w = make(shape, seed, cls.weight_std)
                h = synthetic_hessian(shape[1], seed) if capabilities.needs_calibration else None
                torch.manual_seed(seed)  # quantizers with random rotations draw from the global generator
                packed = bound_preset.quantizer.quantize_weight(w, bound_preset.config, h)
                require(isinstance(packed, PackedWeight),
                        f"{who(bound_preset, 'pack')} returned {type(packed).__name__}, expected PackedWeight")
                cases.append(WeightCase(kind, shape, seed, w, h, packed))
        return cases

    # -- helpers ----------------------------------------------------------------------------------------
    @staticmethod
    def ref_dtype(caps: Capabilities) -> torch.dtype:
        """float32 when supported (it is on every CPU), else the first declared dtype."""
        return torch.float32 if "float32" in caps.dtypes else dtype_from_name(caps.dtypes[0])

    def device_list(self) -> tuple[str, ...]:
        if self.devices is not None:
            return self.devices
        return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

    def dense(self, bq: Preset, case: WeightCase, dtype: torch.dtype) -> torch.Tensor:
        """The whole materialized weight, shape-checked so later messages can trust it."""
        w = bq.quantizer.materialize(case.packed, dtype=dtype, device="cpu")
        require(isinstance(w, torch.Tensor) and tuple(w.shape) == case.shape,
                f"{who(bq, 'materialize')}(packed, dtype={dtype}) returned "
                f"{tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__}; "
                f"expected shape {case.shape} = [out, in] for the {case}")
        return w

    def same(self, a: torch.Tensor, b: torch.Tensor) -> bool:
        """Bit-exact unless the class relaxes ``atol``."""
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return torch.equal(a, b) if self.atol == 0 else max_abs_diff(a, b) <= self.atol

    # -- materialize -------------------------------------------------------------------------------------
    def test_materialize_shape_dtype_device(self, bound_preset, capabilities, weight_cases) -> None:
        bq, q = bound_preset, bound_preset.quantizer
        for case in weight_cases:
            if case.kind != "gaussian":
                continue
            ref = self.dense(bq, case, self.ref_dtype(capabilities))
            for dname in capabilities.dtypes:
                dt = dtype_from_name(dname)
                for dev in self.device_list():
                    packed = case.packed if case.packed.device.type == dev else case.packed.to(dev)
                    for device in (dev, None):
                        w = q.materialize(packed, dtype=dt, device=device)
                        call = f"{who(bq, 'materialize')}(packed on {dev}, dtype={dt}, device={device!r})"
                        require(isinstance(w, torch.Tensor), f"{call} returned {type(w).__name__}, not a Tensor")
                        require(tuple(w.shape) == case.shape,
                                f"{call} returned shape {tuple(w.shape)}; expected {case.shape} = [out, in] "
                                f"for the {case}")
                        require(w.dtype == dt, f"{call} returned dtype {w.dtype}; expected {dt}, which "
                                f"Capabilities.dtypes declares")
                        require(w.device.type == dev, f"{call} returned a tensor on {w.device}; expected {dev} "
                                "(device=None means the packed tensors' device)")
                        require(bool(torch.isfinite(w).all()), f"{call} returned NaN/inf for the {case}")
                    diff = max_abs_diff(w.cpu(), ref)
                    tol = self.low_precision_rtol * float(ref.abs().max())
                    require(diff <= tol, f"{who(bq, 'materialize')} in {dt} differs from {ref.dtype} by {diff:.3g} "
                            f"(> {tol:.3g} = low_precision_rtol * max|W|) for the {case}")

    def test_materialize_T_matches_transpose(self, bound_preset, capabilities, weight_cases) -> None:
        bq, q, dt = bound_preset, bound_preset.quantizer, self.ref_dtype(capabilities)
        for case in (c for c in weight_cases if c.kind == "gaussian"):
            w = self.dense(bq, case, dt)
            out_f, in_f = case.shape
            wt = q.materialize_T(case.packed, dtype=dt, device="cpu")
            require(tuple(wt.shape) == (in_f, out_f),
                    f"{who(bq, 'materialize_T')}(packed, dtype={dt}) returned shape {tuple(wt.shape)}; "
                    f"expected {(in_f, out_f)} = [in, out] for the {case}")
            require(self.same(wt, w.T), f"{who(bq, 'materialize_T')} differs from materialize().T by "
                    f"{max_abs_diff(wt, w.T):.3g} (atol {self.atol}) for the {case}")
            for k in self.block_sizes:
                for a in range(0, out_f, k):
                    b = min(a + k, out_f)
                    blk = q.materialize_T(case.packed, dtype=dt, device="cpu", cols=slice(a, b))
                    call = f"{who(bq, 'materialize_T')}(cols=slice({a}, {b}))"
                    require(tuple(blk.shape) == (in_f, b - a),
                            f"{call} returned shape {tuple(blk.shape)}; expected {(in_f, b - a)} for the {case}")
                    require(self.same(blk, w[a:b].T), f"{call} differs from materialize()[{a}:{b}].T by "
                            f"{max_abs_diff(blk, w[a:b].T):.3g} (atol {self.atol}) for the {case}")

    def test_row_blocks_match_whole(self, bound_preset, capabilities, weight_cases) -> None:
        bq, q, dt = bound_preset, bound_preset.quantizer, self.ref_dtype(capabilities)
        for case in (c for c in weight_cases if c.kind == "gaussian"):
            w = self.dense(bq, case, dt)
            out_f, in_f = case.shape
            for k in self.block_sizes:
                for a in range(0, out_f, k):
                    b = min(a + k, out_f)  # the last block is ragged unless k divides out
                    blk = q.materialize(case.packed, dtype=dt, device="cpu", rows=slice(a, b))
                    call = f"{who(bq, 'materialize')}(rows=slice({a}, {b}))"
                    require(tuple(blk.shape) == (b - a, in_f),
                            f"{call} returned shape {tuple(blk.shape)}; expected {(b - a, in_f)} for the {case}")
                    require(self.same(blk, w[a:b]), f"{call} differs from materialize()[{a}:{b}] by "
                            f"{max_abs_diff(blk, w[a:b]):.3g} (atol {self.atol}) for the {case}")

    # -- storage -----------------------------------------------------------------------------------------
    def test_safetensors_round_trip_is_bit_exact(self, bound_preset, capabilities, weight_cases,
                                                 tmp_path) -> None:
        from safetensors import safe_open
        from safetensors.torch import load_file, save_file

        bq, q, dt = bound_preset, bound_preset.quantizer, self.ref_dtype(capabilities)
        for i, case in enumerate(weight_cases):
            path = tmp_path / f"case{i}.safetensors"
            meta = json.dumps(case.packed.metadata())
            try:
                save_file(case.packed.tensors, str(path), metadata={PACKED_METADATA_KEY: meta})
            except Exception as e:  # noqa: BLE001 - name the method whose output safetensors refused
                raise AssertionError(f"{who(bq, 'pack')} produced tensors safetensors cannot save "
                                     f"({type(e).__name__}: {e}) for the {case}") from e
            with safe_open(str(path), framework="pt") as f:
                loaded_meta = json.loads(f.metadata()[PACKED_METADATA_KEY])
            p2 = q.unpack(load_file(str(path)), loaded_meta)
            call = who(bq, "unpack")
            require(isinstance(p2, PackedWeight), f"{call} returned {type(p2).__name__}, expected PackedWeight")
            require(tuple(p2.shape) == case.shape and p2.dtype == case.packed.dtype,
                    f"{call} gave shape {p2.shape} dtype {p2.dtype}; expected {case.shape} {case.packed.dtype}")
            require(p2.config == case.packed.config, f"{call} gave config {p2.config!r}; expected "
                    f"{case.packed.config!r}")
            require(p2.format_version == case.packed.format_version,
                    f"{call} gave format_version {p2.format_version}; expected {case.packed.format_version}")
            w1, w2 = self.dense(bq, case, dt), q.materialize(p2, dtype=dt, device="cpu")
            require(self.same(w1, w2), f"{who(bq, 'materialize')} after pack -> safetensors -> unpack differs "
                    f"by {max_abs_diff(w1, w2):.3g} from before (atol {self.atol}) for the {case}")

    def test_packed_tensors_are_plain(self, bound_preset, weight_cases) -> None:
        bq = bound_preset
        for case in weight_cases:
            p = case.packed
            require(isinstance(p.tensors, dict) and p.tensors, f"{who(bq, 'pack')} gave no tensors for the {case}")
            require(p.family == bq.family, f"{who(bq, 'pack')} set PackedWeight.family={p.family!r}; "
                    f"expected the family name {bq.family!r}")
            for key, t in p.tensors.items():
                where = f"{who(bq, 'pack')} tensor {key!r} for the {case}"
                require(isinstance(key, str), f"{where}: keys must be str, got {type(key).__name__}")
                require(type(t) is torch.Tensor,
                        f"{where} is a {type(t).__name__}; expected a plain torch.Tensor (never a Parameter "
                        "or tensor subclass: packed data lives in module buffers)")
                require(not t.requires_grad, f"{where} requires grad; packed storage is frozen")
                require(t.is_contiguous(), f"{where} is not contiguous; call .contiguous() (safetensors needs it)")
                require(t.device.type == "cpu", f"{where} is on {t.device}; a CPU weight must pack on the CPU")
            try:
                json.dumps(p.metadata())
            except TypeError as e:
                raise AssertionError(f"{who(bq, 'pack')}: PackedWeight.metadata() is not JSON ({e}); keep "
                                     "`extra` to str/int/float/bool/list/dict") from e

    def test_reconstruction_error_gaussian(self, bound_preset, capabilities, weight_cases) -> None:
        self._check_error(bound_preset, capabilities, weight_cases, "gaussian",
                          capabilities.max_relative_error, "max_relative_error")

    def test_reconstruction_error_heavy_tailed(self, bound_preset, capabilities, weight_cases) -> None:
        bound = capabilities.max_relative_error_heavy_tailed
        name = "max_relative_error_heavy_tailed"
        if bound is None:
            bound, name = 2 * capabilities.max_relative_error, "2 x max_relative_error (heavy-tailed default)"
        self._check_error(bound_preset, capabilities, weight_cases, "student_t", bound, name)

    def _check_error(self, bq: Preset, caps: Capabilities, cases: list[WeightCase], kind: str,
                     bound: float, name: str) -> None:
        limit = bound * self.error_bound_slack
        bad = []
        for case in (c for c in cases if c.kind == kind):
            err = relative_error(case.weight, self.dense(bq, case, self.ref_dtype(caps)))
            if not err <= limit:
                bad.append(f"{case}: {err:.4f}")
        require(not bad, f"{who(bq, 'quantize')}: relative Frobenius error ||W - Q(W)|| / ||W|| above the "
                f"declared Capabilities.{name} = {bound:g} (x error_bound_slack {self.error_bound_slack:g}): "
                + "; ".join(bad))

    def test_bits_per_weight_within_budget(self, bound_preset, capabilities, weight_cases) -> None:
        budget = capabilities.max_bits_per_weight
        bad = [f"{c}: {c.packed.bits_per_weight():.4f}" for c in weight_cases
               if not c.packed.bits_per_weight() <= budget]
        require(not bad, f"{who(bound_preset, 'pack')}: storage bits per weight (all packed tensors) above "
                f"the declared Capabilities.max_bits_per_weight = {budget:g}: " + "; ".join(bad))

    def test_packed_nbytes_matches_pack(self, bound_preset, weight_cases) -> None:
        # the memory planner sizes models by packed_nbytes alone: it must be exact, not an estimate
        bq = bound_preset
        sizes = {c.shape: c.packed.nbytes() for c in weight_cases}
        bad = [f"{s[0]}x{s[1]}: {got} (pack stored {n})" for s, n in sizes.items()
               if (got := bq.quantizer.packed_nbytes(s, bq.config)) != n]
        require(not bad, f"{who(bq, 'packed_nbytes')}: bytes predicted for a weight differ from the packed "
                f"tensors' (the memory planner relies on it being exact): " + "; ".join(bad))

    # -- config ------------------------------------------------------------------------------------------
    def test_config_json_round_trip(self, bound_preset, weight_cases) -> None:
        bq, cfg, cls = bound_preset, bound_preset.config, type(bound_preset.quantizer).config_class
        text = cfg.to_json()
        data = json.loads(text)
        require(data.get("family") == bq.family, f"{type(cfg).__name__}.to_json() records family "
                f"{data.get('family')!r}; expected {bq.family!r} (set the config class's `family`)")
        back = cls.from_json(text)
        require(type(back) is type(cfg) and back == cfg,
                f"{type(cfg).__name__}.from_json(to_json()) gave {back!r}; expected {cfg!r}")
        with pytest.raises(QuantizerConfigError):
            cls.from_json({**data, "family": bq.family + "-other"})
        p = weight_cases[0].packed
        meta = p.metadata()
        require(meta["config"].get("family") == bq.family, f"{who(bq, 'pack')}: metadata config lacks family")
        require(p.format_version == type(bq.quantizer).format_version,
                f"{who(bq, 'pack')} wrote format_version {p.format_version}; the class declares "
                f"{type(bq.quantizer).format_version}")
        p2 = bq.quantizer.unpack(p.tensors, json.loads(json.dumps(meta)))
        require(p2.config == cfg, f"{who(bq, 'unpack')} gave config {p2.config!r}; expected {cfg!r}")

    def test_rejects_invalid_config(self, bound_preset) -> None:
        cls = type(bound_preset.quantizer).config_class
        cases = self.invalid_configs
        if cases is None:
            cases = ({"not_a_config_field": 1},) + (({"bits": 99},) if "bits" in cls.model_fields else ())
        base = json.loads(bound_preset.config.to_json())
        for override in cases:
            try:
                cls.from_json({**base, **override})
            except QuantizerConfigError as e:
                for field in override:
                    require(field in str(e), f"{cls.__name__}.from_json({override}) raised, but its message "
                            f"does not name the field {field!r}: {e}")
            else:
                raise AssertionError(f"{cls.__name__}.from_json accepted the invalid value(s) {override}; a "
                                     "config must reject what the quantizer cannot do (pydantic validators)")

    # -- determinism and input validation -----------------------------------------------------------------
    def test_deterministic(self, bound_preset, capabilities, weight_cases) -> None:
        if not capabilities.deterministic:
            pytest.skip("Capabilities.deterministic is False: the packed tensors may differ between runs")
        bq = bound_preset
        for case in weight_cases[:2]:  # one Gaussian, one heavy-tailed
            runs = []
            for _ in range(2):
                torch.manual_seed(self.seed)
                runs.append(bq.quantizer.quantize_weight(case.weight.clone(), bq.config, case.hessian))
            a, b = runs
            require(sorted(a.tensors) == sorted(b.tensors),
                    f"{who(bq, 'pack')} gave tensors {sorted(a.tensors)} then {sorted(b.tensors)}")
            for key in a.tensors:
                ta, tb = a.tensors[key], b.tensors[key]
                require(ta.dtype == tb.dtype and ta.shape == tb.shape and torch.equal(ta, tb),
                        f"{who(bq, 'quantize')} is not deterministic: packed tensor {key!r} differs between two "
                        f"runs on the same {case} under the same seed (or declare deterministic=False)")

    def test_quantize_leaves_weight_unchanged(self, bound_preset, capabilities, weight_cases) -> None:
        case = weight_cases[0]
        w, h = case.weight.clone(), None if case.hessian is None else case.hessian.clone()
        bound_preset.quantizer.quantize_weight(w, bound_preset.config, h)
        require(torch.equal(w, case.weight), f"{who(bound_preset, 'quantize')} modified its input weight "
                "in place; work on a copy")
        require(h is None or torch.equal(h, case.hessian),
                f"{who(bound_preset, 'quantize')} modified the Hessian in place; work on a copy")

    def _expect_invalid(self, bq: Preset, caps: Capabilities, weight: Any, what: str,
                        in_features: int) -> None:
        # a valid Hessian of the right size, so that only the weight can be the reason to refuse
        h = synthetic_hessian(in_features, self.seed) if caps.needs_calibration else None
        try:
            bq.quantizer.quantize_weight(weight, bq.config, h)
        except InvalidWeightError:
            return
        except Exception as e:  # noqa: BLE001 - the wrong exception type is the finding
            raise AssertionError(f"{who(bq, 'quantize_weight')} raised {type(e).__name__}: {e} for {what}; "
                                 "expected InvalidWeightError (modulora_core.errors)") from e
        raise AssertionError(f"{who(bq, 'quantize_weight')} accepted {what}; expected InvalidWeightError")

    def _valid_weight(self, caps: Capabilities) -> torch.Tensor:
        shape = fit_shape(self.shapes[0], caps.out_multiple, caps.in_multiple)
        return gaussian_weight(shape, self.seed, self.weight_std)

    def test_rejects_wrong_ndim(self, bound_preset, capabilities) -> None:
        w = self._valid_weight(capabilities)
        in_f = w.shape[1]
        self._expect_invalid(bound_preset, capabilities, w.reshape(-1), f"a 1-D weight of shape {(w.numel(),)}",
                             in_f)
        self._expect_invalid(bound_preset, capabilities, w[None], f"a 3-D weight of shape {tuple(w[None].shape)}",
                             in_f)

    def test_rejects_nan(self, bound_preset, capabilities) -> None:
        w = self._valid_weight(capabilities)
        w[0, 0] = float("nan")
        self._expect_invalid(bound_preset, capabilities, w, "a weight with a NaN", w.shape[1])

    def test_rejects_inf(self, bound_preset, capabilities) -> None:
        for v in (float("inf"), float("-inf")):
            w = self._valid_weight(capabilities)
            w[-1, -1] = v
            self._expect_invalid(bound_preset, capabilities, w, f"a weight with {v}", w.shape[1])

    def test_rejects_integer_dtype(self, bound_preset, capabilities) -> None:
        w = self._valid_weight(capabilities)
        g = torch.Generator().manual_seed(self.seed)
        self._expect_invalid(bound_preset, capabilities,
                             torch.randint(-8, 8, w.shape, generator=g, dtype=torch.int32), "an int32 weight",
                             w.shape[1])

    def test_rejects_shape_not_multiple(self, bound_preset, capabilities) -> None:
        caps = capabilities
        if caps.in_multiple == 1 and caps.out_multiple == 1:
            pytest.skip("Capabilities.in_multiple and out_multiple are 1: every shape is valid")
        out_f, in_f = self._valid_weight(caps).shape
        if caps.in_multiple > 1:
            self._expect_invalid(bound_preset, caps, gaussian_weight((out_f, in_f + 1), self.seed),
                                 f"in_features={in_f + 1}, not a multiple of in_multiple={caps.in_multiple}",
                                 in_f + 1)
        if caps.out_multiple > 1:
            self._expect_invalid(bound_preset, caps, gaussian_weight((out_f + 1, in_f), self.seed),
                                 f"out_features={out_f + 1}, not a multiple of out_multiple={caps.out_multiple}",
                                 in_f)

    def test_requires_hessian_when_calibrated(self, bound_preset, capabilities) -> None:
        if not capabilities.needs_calibration:
            pytest.skip("Capabilities.needs_calibration is False: quantize() takes no Hessian")
        bq, w = bound_preset, self._valid_weight(capabilities)
        for h, what in ((None, "no Hessian"), (torch.eye(w.shape[1] + 1), "a Hessian of the wrong size")):
            try:
                bq.quantizer.quantize_weight(w, bq.config, h)
            except InvalidWeightError:
                continue
            raise AssertionError(f"{who(bq, 'quantize_weight')} accepted {what}; expected InvalidWeightError")
