"""What the commands share: error reporting, output directories, and reading target options. Loading models
(the default model and quantizer, a quantized base, an adapter) is :mod:`modulora.finetune.models`."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

import typer

from modulora.finetune.console import console, is_main_process, say

__all__ = ["console", "fail", "help_text", "is_main_process", "say", "split_names", "targets_option",
           "user_errors", "writable_dir"]

_REGEX_CHARS = set("*()[]|^$\\+?{}")


def fail(msg: str, code: int = 2) -> typer.Exit:
    """Print ``error: msg`` and return the Exit to raise."""
    console.print(f"[bold red]error:[/] {msg}", soft_wrap=True)
    return typer.Exit(code)


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Turn our own errors (and unreadable/unwritable paths) into ``error: ...`` and exit status 2; Ctrl-C
    into a message and status 130."""
    from pydantic import ValidationError

    from modulora_core.errors import ModuLoRAError

    try:
        yield
    except ModuLoRAError as e:
        raise fail(str(e)) from None
    except ValidationError as e:  # an option value the configs refuse: name the option, not pydantic's dump
        raise fail("; ".join(_option_error(err) for err in e.errors())) from None
    except OSError as e:
        raise fail(f"{e.strerror or e} ({e.filename or ''})".strip()) from None
    except KeyboardInterrupt:  # saves are staged: nothing half-written is left behind
        raise fail("interrupted (Ctrl-C); nothing was written", 130) from None


def _option_error(err: dict) -> str:
    """One pydantic error as ``--option-name: message`` (model-level checks carry no field)."""
    msg = str(err.get("msg", "")).removeprefix("Value error, ")
    loc = [str(p) for p in err.get("loc", ()) if isinstance(p, str)]
    if not loc:
        return msg
    return f"--{loc[0].replace('_', '-')}: {msg} (got {err.get('input')!r})"


def help_text(text: str) -> str:
    """``text`` shown as written in ``--help`` (rich would take ``[default: ...]`` for markup)."""
    return text.replace("[", "\\[")


def split_names(value: str | list[str] | None) -> list[str]:
    """``"q_proj, v_proj"`` -> ``["q_proj", "v_proj"]``; None or blank -> ``[]``."""
    if isinstance(value, list):
        return value
    return [s.strip() for s in (value or "").split(",") if s.strip()]


def targets_option(value: str | list[str] | None) -> list[str] | str | None:
    """A ``--targets`` / ``--lora-targets`` value in PEFT's terms: comma-separated names -> a list (matched
    by name or ``.``-suffix); ``all-linear`` or a regex (it has regex characters) stays a string; blank or
    None -> None (the default)."""
    if value is None or isinstance(value, list):
        return value or None
    v = value.strip()
    if not v:
        return None
    if v == "all-linear" or any(ch in _REGEX_CHARS for ch in v):
        return v
    return split_names(v)


def writable_dir(path: Path, what: str = "output directory") -> Path:
    """Create ``path`` if needed and check a file can be written in it; else exit with a clear error."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".modulora-write-test-"):
            pass
    except OSError as e:
        raise fail(f"{what} {path} is not writable ({e.strerror or e}); pass --out with a writable "
                   f"directory") from None
    return path
