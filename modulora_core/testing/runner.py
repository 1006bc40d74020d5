"""Run the conformance kit against any installed preset, without writing a test file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from ..errors import ModuLoRAError
from ..registry import get_preset

ENV_VAR = "MODULORA_CONFORMANCE_PRESET"
SUITE_MODULE = "modulora_core.testing.preset_suite"


def run_conformance(name: str, pytest_args: list[str] | None = None) -> int:
    """Run every conformance check on preset ``name`` in this process; returns pytest's exit status.

    ``pytest_args`` are passed on (``["-x", "-k", "materialize"]``). An unknown ``name`` prints the
    registry's message (installed presets, which distribution provides it) and returns
    ``pytest.ExitCode.USAGE_ERROR`` without running anything.
    """
    try:
        bq = get_preset(name)
    except ModuLoRAError as e:
        print(f"modulora conformance: {e}", file=sys.stderr)
        return int(pytest.ExitCode.USAGE_ERROR)
    version = f" {bq.version}" if bq.version else ""
    print(f"modulora conformance kit: {bq.name!r} (family {bq.family!r}, plugin {bq.plugin!r}{version})",
          flush=True)
    args = [
        "--pyargs", SUITE_MODULE,
        # the user's own pytest config (addopts, testpaths, plugins) must not leak into the kit's run
        "-c", os.devnull, "--rootdir", str(Path(__file__).parent),
        "-p", "no:cacheprovider",
        *(pytest_args or []),
    ]
    old = os.environ.get(ENV_VAR)
    os.environ[ENV_VAR] = name
    try:
        return int(pytest.main(args))
    finally:
        if old is None:
            os.environ.pop(ENV_VAR, None)
        else:
            os.environ[ENV_VAR] = old
