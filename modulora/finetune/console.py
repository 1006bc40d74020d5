"""Status lines of the jobs and commands: on stderr, from the main process only (under torchrun every
process runs the job; one of them speaks)."""

from __future__ import annotations

import os

from rich.console import Console

console = Console(stderr=True, highlight=False, soft_wrap=True)


def is_main_process() -> bool:
    """False on every process but rank 0 under torchrun / accelerate launch."""
    return int(os.environ.get("RANK", "0")) == 0


def say(msg: str) -> None:
    """A status line on stderr (rich markup), from the main process only."""
    if is_main_process():
        console.print(msg)
