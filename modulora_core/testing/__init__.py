"""The conformance kit for quantizer plugins.

``class TestMine(QuantizerConformance): preset = "mine-3bit"`` in a pytest file checks a preset against
the Quantizer protocol; :func:`run_conformance` (and ``modulora plugins check NAME``) runs the same suite on
any installed preset without writing a file.
"""

from __future__ import annotations

from .conformance import QuantizerConformance
from .device_guard import DeviceDisciplineError, DeviceGuard
from .runner import ENV_VAR, run_conformance
from .support import WeightCase
from .weights import gaussian_weight, relative_error, student_t_weight, synthetic_hessian

__all__ = [
    "ENV_VAR", "DeviceDisciplineError", "DeviceGuard", "QuantizerConformance", "WeightCase", "gaussian_weight", "relative_error", "run_conformance",
    "student_t_weight", "synthetic_hessian",
]
