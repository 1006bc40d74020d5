"""Files ModuLoRA writes and reads: staged (all-or-nothing) writes, JSON and safetensors, clear errors."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import safetensors
import torch

STAGE_PREFIX = ".modulora-tmp-"  # + "<pid>-<random>": the pid tells a live save from a killed one


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: it exists, under another user
        return True
    return True


def remove_stale_stages(directory: str | os.PathLike) -> list[Path]:
    """Remove the staging folders that killed saves left in ``directory`` (their process is gone, or they
    predate pid-named folders); a save in progress in a living process is left alone. Returns the removed
    ones; a directory we may not write to is left as it is."""
    d = Path(directory)
    removed = []
    for p in d.glob(STAGE_PREFIX + "*") if d.is_dir() else ():
        pid = p.name[len(STAGE_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        if not p.exists():
            removed.append(p)
    return removed


@contextlib.contextmanager
def staged_writes(directory: str | os.PathLike, last: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a staging folder inside ``directory``; on success move every file in it over its final name
    (``os.replace``: atomic per file, same filesystem), the ``last`` ones last. On error nothing is moved,
    so an earlier save in ``directory`` stays intact. Staging folders of killed saves are removed first."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    remove_stale_stages(d)
    stage = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}-", dir=d))
    try:
        yield stage
        for name in sorted(os.listdir(stage), key=lambda n: (n in last, last.index(n) if n in last else 0)):
            os.replace(stage / name, d / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path, error: type[Exception]) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise error(f"cannot read {path}: {e}; the file is missing or not valid JSON") from e


def read_safetensors(path: Path, error: type[Exception]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of ``path`` plus its metadata; a truncated or corrupted file raises ``error`` naming it."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, meta  # noqa: SIM118 - safe_open has no iterator
    except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ValueError...
        raise error(f"cannot read {path} ({type(e).__name__}: {e}); the file is truncated or corrupted, "
                    f"save it again") from e


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes of ``tensors`` (CPU), in name order: detects data
    corruption that safetensors' header checks cannot see."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the tensor's bytes, no copy
    return h.hexdigest()
