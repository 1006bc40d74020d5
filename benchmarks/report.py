"""Write one section of docs/benchmarks.md (between BEGIN/END markers) atomically, with its provenance."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import tempfile
from pathlib import Path

DEFAULT_REPORT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"
# MODULORA_BENCH_REPORT sends a whole run elsewhere (``benchmarks.run --quick`` writes a page of its own, so
# a quick run never overwrites the full figures); child scripts inherit it through the environment
REPORT = Path(os.environ.get("MODULORA_BENCH_REPORT") or DEFAULT_REPORT).resolve()
_OWN = REPORT == DEFAULT_REPORT
# Raw results of each section, for benchmarks/plots.py (docs/data/<section>.json) and for readers; figures
DATA = REPORT.parent / ("data" if _OWN else f"{REPORT.stem}-data")
IMG = REPORT.parent / ("img" if _OWN else f"{REPORT.stem}-img")
HEADER = "# Benchmarks\n\nEvery section is written by the script named in it; rerun that command to regenerate it.\n"


def machine() -> str:
    """One line: CPU count, Python, torch and transformers versions, date."""
    import torch
    import transformers

    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"{_dt.date.today().isoformat()}")


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_data(name: str, command: str, rows: object, directory: Path = DATA) -> Path:
    """Save the raw results of section ``name`` as ``docs/data/<name>.json`` (with machine and command)."""
    path = directory / f"{name}.json"
    payload = {"section": name, "command": command, "machine": machine(), "rows": rows}
    _atomic_write(path, json.dumps(payload, indent=1, default=str) + "\n")
    return path


def read_data(name: str, directory: Path = DATA) -> dict | None:
    """The payload :func:`write_data` saved for ``name``, or None when that benchmark has not been run."""
    path = directory / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


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
    _atomic_write(path, text)
