"""``torch.compile``'d kernels with an eager fallback, for plugins' materialize and decode paths.

A plugin writes its unpack-and-scale (or its decode-step product) as a pure tensor function and wraps it in
:func:`kernel`. Compiled, inductor fuses the unpack, the scale and the cast into one loop (C++ on a CPU,
Triton on a GPU) instead of one pass over the weight per torch op; if compiling fails (no compiler, an op
inductor lacks), the kernel warns once and runs the function eagerly from then on: same results, slower.

``$MODULORA_COMPILE`` chooses where to compile: ``auto`` (default) on CUDA only, since on a CPU every new
shape costs seconds of compilation (set ``1`` for long CPU runs), ``1`` everywhere, ``0`` never. On a CPU the
first-party plugins call hand-written C kernels instead (:mod:`modulora_core.native`, built once per machine),
except under ``0``, which means plain torch everywhere.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

ENV = "MODULORA_COMPILE"
SMALL_BATCH = 4  # inputs of at most this many rows (decode steps) take a plugin's matmul_small where kernels compile


def compile_mode() -> str:
    """``"auto"``, ``"1"`` or ``"0"`` from ``$MODULORA_COMPILE`` (anything else reads as ``"auto"``)."""
    v = os.environ.get(ENV, "auto").strip().lower()
    return v if v in ("0", "1") else "auto"


def compiles_on(device: torch.device) -> bool:
    """Whether kernels compile for tensors on ``device`` (see :func:`compile_mode`)."""
    mode = compile_mode()
    return mode == "1" or (mode == "auto" and device.type == "cuda")


class Kernel:
    """A pure tensor function, called compiled where :func:`compile_mode` says so, else eagerly."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", "kernel")
        self.__doc__ = fn.__doc__
        self._compiled: Callable[..., Any] | None = None
        self.failed = False

    def wants_compile(self, device: torch.device) -> bool:
        return not self.failed and compiles_on(device)

    def __call__(self, *args: Any) -> Any:
        dev = next((a.device for a in args if isinstance(a, torch.Tensor)), torch.device("cpu"))
        if self.wants_compile(dev):
            if self._compiled is None:
                self._compiled = torch.compile(self.fn, dynamic=False)
            try:
                return self._compiled(*args)
            except Exception as e:  # noqa: BLE001 - any compiler failure: the eager function is the same math
                self.failed = True
                warnings.warn(f"torch.compile of {self.__name__} failed ({type(e).__name__}: {str(e)[:200]}); "
                              "running it eagerly from now on", stacklevel=2)
        return self.fn(*args)


def kernel(fn: Callable[..., Any]) -> Kernel:
    """Decorator: ``fn`` compiled where :func:`compile_mode` says so, with an eager fallback."""
    return Kernel(fn)
