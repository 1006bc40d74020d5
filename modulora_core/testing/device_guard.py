"""A guard that makes GPU-only device bugs fail on a CPU-only machine.

On a CPU the weight, the defaults and the host are one device, so code that builds a tensor on the default
device, copies to the host or reads a value back to Python works by accident and breaks (or stalls) the
first time it meets a GPU. Inside :class:`DeviceGuard` those habits raise :class:`DeviceDisciplineError`:

- a factory (``torch.arange``, ``torch.zeros``, ``torch.tensor``, ...) called without ``device=``: on a GPU
  it lands on the CPU, away from the weight (``*_like`` and ``x.new_*`` follow their input and are fine;
  a constant that is meant to live on the CPU says so with ``device="cpu"``);
- ``x.cpu()`` / ``x.numpy()``: a copy to the host;
- an op whose tensor arguments sit on two devices (0-dim CPU tensors excepted, as CUDA accepts them);
- with ``forbid_sync=True`` (forward and backward): anything that reads a tensor's value into Python or
  sizes an output by the data (``float(t)``, ``bool(t)``, ``t.item()``, ``torch.equal``, ``nonzero``, ...),
  each a host sync that stalls the GPU stream.

It is a ``TorchFunctionMode``, so it sees every torch call made in its ``with`` block, in our code, the
plugin's and PEFT's alike; the conformance kit runs quantize, materialize, forward and backward inside one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

# factories whose result goes to the default device unless told otherwise
_FACTORIES = {
    torch.tensor, torch.as_tensor, torch.arange, torch.range, torch.zeros, torch.ones, torch.empty, torch.full,
    torch.eye, torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.logspace,
    torch.empty_strided, torch.scalar_tensor, torch.tril_indices, torch.triu_indices,
}
_HOST_COPIES = {torch.Tensor.cpu, torch.Tensor.numpy}
_SYNCS = {
    torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__, torch.Tensor.__index__,
    torch.Tensor.__complex__, torch.Tensor.item, torch.Tensor.tolist, torch.equal, torch.Tensor.equal,
    torch.nonzero, torch.Tensor.nonzero, torch.masked_select, torch.Tensor.masked_select, torch.unique,
    torch.Tensor.unique, torch.argwhere, torch.Tensor.argwhere,
}


class DeviceDisciplineError(AssertionError):
    """Code inside a :class:`DeviceGuard` did something that fails or stalls on a GPU."""


def _name(func: Any) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    return qual if qual.startswith("Tensor.") else f"torch.{qual}"


class DeviceGuard(TorchFunctionMode):
    """``with DeviceGuard(forbid_sync=...):`` raise on GPU-hostile torch calls (see the module docstring).

    ``where`` names the code under test in the messages (``"rtn-4bit materialize"``).
    """

    def __init__(self, where: str = "this code", *, forbid_sync: bool = False) -> None:
        super().__init__()
        self.where = where
        self.forbid_sync = forbid_sync

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("device") is None and not (
                func is torch.as_tensor and args and isinstance(args[0], torch.Tensor)):
            raise DeviceDisciplineError(
                f"{self.where}: {_name(func)}(...) without device= makes a tensor on the default device (the CPU "
                "on a GPU machine), away from the weight; pass device=<the weight's device> (or device='cpu' "
                "for a constant that is meant to live on the host and be cached per device)")
        if func in _HOST_COPIES:
            raise DeviceDisciplineError(f"{self.where}: {_name(func)}() copies a tensor to the host; keep the "
                                        "work on the weight's device")
        if self.forbid_sync and func in _SYNCS:
            raise DeviceDisciplineError(
                f"{self.where}: {_name(func)} reads a tensor's value back to Python (a host sync that stalls the "
                "GPU) inside forward/backward; keep it a tensor, or decide it once when the weight is packed")
        devices = {t.device for t in tree_leaves((args, kwargs))
                   if isinstance(t, torch.Tensor) and not (t.dim() == 0 and t.device.type == "cpu")}
        if len(devices) > 1:
            raise DeviceDisciplineError(f"{self.where}: {_name(func)} mixes tensors on {sorted(map(str, devices))}")
        return func(*args, **kwargs)
