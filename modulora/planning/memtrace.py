"""Peak bytes of the tensors a piece of code creates, counted exactly, on any device (meta included).

The planner uses it to learn what a plugin's ``materialize`` allocates besides its result (unpacked codes,
casts, ...) without a GPU and without reading the process's memory, which other threads and the allocator
blur. A ``TorchDispatchMode`` sees every tensor an aten op returns; each storage is counted once while any
tensor on it is alive, so views and in-place ops cost nothing extra, as in a real allocator.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

T = TypeVar("T")


def _storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    s = t.untyped_storage()
    # meta storages have no address: their tensors' ids stand in (a view of one is then counted twice,
    # which only over-counts views created on meta)
    ptr = s.data_ptr() if t.device.type != "meta" else id(t)
    return (t.device.type, t.device.index, ptr)


class PeakTracker(TorchDispatchMode):
    """``with PeakTracker() as pt: ...`` then ``pt.peak``: the most bytes the ops inside held at once.

    Only storages created inside the block count (inputs that existed before are free); ``pt.live`` is
    what is still held when the block ends (the result, typically).
    """

    def __init__(self) -> None:
        super().__init__()
        self._refs: dict[tuple[Any, ...], tuple[list[weakref.ref], int]] = {}
        self._before: set[tuple[Any, ...]] = set()
        self.peak = 0
        self.live = 0

    def note_existing(self, *tensors: torch.Tensor) -> None:
        """Storages of ``tensors`` are not new, even if an op returns them (in-place ops, views)."""
        for t in tensors:
            self._before.add(_storage_key(t))

    def _sweep(self) -> int:
        total = 0
        for key in list(self._refs):
            refs, nbytes = self._refs[key]
            alive = [r for r in refs if r() is not None]
            if alive:
                self._refs[key] = (alive, nbytes)
                total += nbytes
            else:
                del self._refs[key]
        return total

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                key = _storage_key(t)
                if key in self._before:
                    continue
                refs, nbytes = self._refs.get(key, ([], 0))
                refs = [r for r in refs if r() is not None]
                if not refs:  # a new storage, possibly at the address of one freed inside this op
                    nbytes = t.untyped_storage().nbytes()
                refs.append(weakref.ref(t))
                self._refs[key] = (refs, nbytes)
        self.live = self._sweep()
        self.peak = max(self.peak, self.live)
        return out

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        self.live = self._sweep()


def peak_bytes(fn: Callable[[], T], *existing: torch.Tensor) -> tuple[int, T]:
    """``(peak bytes created while fn() ran, fn())``; ``existing`` tensors' storages are not counted."""
    with PeakTracker() as pt:
        pt.note_existing(*existing)
        result = fn()
    return pt.peak, result
