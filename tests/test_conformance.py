"""The conformance kit over every installed preset, plus probes that reach its capability-driven branches.

One ``QuantizerConformance`` subclass per registered preset is generated at import, so a newly installed
plugin is checked without editing this file. The probe quantizers below wrap RTN with other declared
capabilities (calibration, fast path, shape multiples, no float64) so that every branch of the kit runs.
"""

from __future__ import annotations

import re

import torch
from modulora_plugin_rtn import RTNConfig, RTNQuantizer

from modulora_core import Capabilities
from modulora_core.registry import Preset, get_registry
from modulora_core.testing import QuantizerConformance


def _class_name(preset: str) -> str:
    return "TestConformance_" + re.sub(r"\W", "_", preset)


for _preset in sorted(get_registry().presets):
    globals()[_class_name(_preset)] = type(_class_name(_preset), (QuantizerConformance,), {"preset": _preset})


class ProbeRTN(RTNQuantizer):
    """RTN declaring what RTN itself does not: calibration, a fast path, shape multiples, float32 only."""

    def capabilities(self, config: RTNConfig) -> Capabilities:
        caps = super().capabilities(config)
        return caps.model_copy(update={
            "needs_calibration": True, "fast_path": True, "in_multiple": 64, "out_multiple": 16,
            "dtypes": ("float32",),
        })

    def quantize(self, weight, config, hessian=None):
        # the kit must hand a calibrated quantizer a finite SPD [in, in] Hessian
        assert hessian is not None and hessian.shape == (weight.shape[1],) * 2
        assert bool(torch.linalg.eigvalsh(hessian.double()).min() > 0)
        return super().quantize(weight, config)

    def matmul(self, x, packed):  # [..., in] -> [..., out], one 16-row tile at a time
        tiles = [x @ self.materialize(packed, dtype=x.dtype, rows=slice(a, a + 16)).T
                 for a in range(0, packed.shape[0], 16)]
        return torch.cat(tiles, dim=-1)

    def matmul_T(self, grad_y, packed):  # [..., out] -> [..., in]
        out = grad_y.new_zeros(*grad_y.shape[:-1], packed.shape[1])
        for a in range(0, packed.shape[0], 16):
            out += grad_y[..., a:a + 16] @ self.materialize(packed, dtype=grad_y.dtype, rows=slice(a, a + 16))
        return out


class TestKitProbe(QuantizerConformance):
    preset = Preset("rtn-probe-4bit", ProbeRTN(), RTNConfig(bits=4), "tests", None)
    # shape multiples of 16 x 64 turn these into (64, 128), (96, 256), (256, 64), (16, 64)
    shapes = ((60, 100), (96, 256), (250, 64))
    gradcheck_shape = (12, 16)


def test_one_class_per_preset() -> None:
    presets = sorted(get_registry().presets)
    assert "rtn-4bit" in presets
    for p in presets:
        cls = globals()[_class_name(p)]
        assert issubclass(cls, QuantizerConformance) and cls.preset == p
