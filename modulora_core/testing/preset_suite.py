"""The conformance suite for the preset named by ``$MODULORA_CONFORMANCE_PRESET``.

:func:`modulora_core.testing.run_conformance` points pytest at this module (``--pyargs``); the name is read
when the tests run, not at import, so one process can check several presets in turn.
"""

from __future__ import annotations

import os
from typing import Any

from .conformance import QuantizerConformance
from .runner import ENV_VAR


class _PresetFromEnv:
    """Class attribute that reads the preset name from the environment on every access."""

    def __get__(self, obj: Any, owner: type | None = None) -> str:
        return os.environ.get(ENV_VAR, "")


class TestConformance(QuantizerConformance):
    preset = _PresetFromEnv()  # type: ignore[assignment]
