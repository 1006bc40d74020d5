"""modulora_core.testing.DeviceGuard: each GPU-only device bug it stands for fails on the CPU, and correct code
passes; constants the plugins need on a device are built once per device."""

from __future__ import annotations

import pytest
import torch

from modulora_core.testing import DeviceDisciplineError, DeviceGuard
from modulora_plugin_quipsharp import hadamard


def test_factory_without_device_is_refused() -> None:
    x = torch.ones(4)
    with DeviceGuard("t"):
        torch.arange(4, device=x.device)  # placed: fine
        torch.zeros_like(x)  # follows its input: fine
        with pytest.raises(DeviceDisciplineError, match="without device="):
            torch.arange(4)  # the OPTQ solver's old habit: a CPU tensor beside a CUDA weight


def test_copy_to_host_is_refused() -> None:
    with DeviceGuard("t"), pytest.raises(DeviceDisciplineError, match="copies a tensor to the host"):
        torch.ones(2, device="cpu").cpu()  # the QuIP# encoder's old round trip


def test_host_sync_is_refused_only_when_asked() -> None:
    s = torch.ones(1)
    with DeviceGuard("t"):
        float(s)  # quantize may read values back
    with DeviceGuard("t", forbid_sync=True):
        y = torch.ones_like(s).expand(3) * s  # the scale as a tensor: no sync
        for read in (lambda: float(s), lambda: bool(s), lambda: s.item(), lambda: torch.equal(y, y)):
            with pytest.raises(DeviceDisciplineError, match="host sync"):
                read()


def test_mixed_devices_are_refused() -> None:
    with DeviceGuard("t"), pytest.raises(DeviceDisciplineError, match="mixes tensors"):
        torch.add(torch.ones(2, device="cpu"), torch.ones(2, device="meta"))


def test_hadamard_factors_are_cached_per_device() -> None:
    p = hadamard.plan(576)  # 16 x 36: Sylvester and Paley factors
    a = hadamard.factors_on(p, None, torch.float32, torch.device("cpu"))
    b = hadamard.factors_on(p, None, torch.float32, torch.device("cpu"))
    assert all(x is y for x, y in zip(a, b, strict=True))  # the same tensors: no copy per call
    m = hadamard.factors_on(p, None, torch.float32, torch.device("meta"))
    assert all(t.device.type == "meta" for t in m)
