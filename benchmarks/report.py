"""Write one section of docs/benchmarks.md (between BEGIN/END markers) atomically, with its provenance."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import tempfile
from pathlib import Path

REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
HEADER = "# Benchmarks\n\nEvery section is written by the script named in it; rerun that command to regenerate it.\n"


def machine() -> str:
    """One line: CPU count, Python, torch and transformers versions, date."""
    import torch
    import transformers

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{_dt.date.today().isoformat()}")


def write_section(name: str, title: str, command: str, body: str, path: Path = REPORT) -> None:
    """Replace (or append) the section ``name`` of the report with ``body`` under ``title``."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = (f"{begin}\n## {title}\n\nCommand: `{command}`  \nMachine: {machine()}\n\n{body.strip()}\n{end}")
    text = path.read_text() if path.exists() else HEADER
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        post = rest.split(end, 1)[1]
        text = pre + block + post
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".benchmarks.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)
