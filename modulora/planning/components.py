"""The lines of a memory plan and how their sizes print (shared by the planner and its FSDP arithmetic)."""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


def format_size(n: int) -> str:
    """Bytes as GiB (or MiB below 1 GiB)."""
    return f"{n / GiB:.2f} GiB" if abs(n) >= GiB else f"{n / (1 << 20):.1f} MiB"


@dataclass
class Component:
    """One line of the plan. ``counted`` is False for the transient that is not at the peak."""

    key: str
    label: str
    nbytes: int
    detail: str = ""
    counted: bool = True
