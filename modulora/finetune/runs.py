"""The run in ``--out``: what identifies it (its fingerprint: model, data, quantizer, adapters), whether a
``--resume`` continues the same run, and whether its last checkpoint can be read, all checked before
anything in ``--out`` changes."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Any

from modulora_core.errors import CheckpointError

from .train_config import RUN_CONFIG, FinetuneConfig

FINGERPRINT = "fingerprint"
_FULL_HASH_BYTES = 64 << 20  # files up to this size are hashed whole
_SAMPLES, _SAMPLE_BYTES = 16, 1 << 20


def file_digest(p: Path) -> str:
    """SHA-256 of a file; above 64 MiB of its size and 16 evenly spaced 1 MiB blocks, so that a 100 GB
    model is fingerprinted in a moment (another model's weights differ in every block)."""
    size = p.stat().st_size
    h = hashlib.sha256(f"{size}|".encode())
    with p.open("rb") as f:
        if size <= _FULL_HASH_BYTES:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            for i in range(_SAMPLES):
                f.seek((size - _SAMPLE_BYTES) * i // (_SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def path_digest(path: str | Path) -> str | None:
    """A digest of a model or data path: its config and weight files (or every file of a data directory);
    None for something that is not local (a hub id)."""
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if not p.is_dir():
        return None
    files = sorted(f for f in p.rglob("*") if f.is_file() and not any(
        part.startswith(".") for part in f.relative_to(p).parts))
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.relative_to(p)}|{file_digest(f)}|".encode())
    return h.hexdigest()


def run_fingerprint(job: FinetuneConfig, model_path: str, preset: str | None) -> dict[str, Any]:
    """What makes two runs the same run: the model (path and digest), the data (task or file and digest),
    what is quantized and how, and the adapters' shape."""
    return {
        "model": {"path": str(model_path), "sha256": path_digest(model_path)},
        "data": ({"file": str(job.data), "sha256": path_digest(job.data)} if job.data else {"task": job.task}),
        "quantizer": {"preset": preset, "targets": job.targets, "skip": list(job.skip)},
        "adapter": {"rank": job.rank, "alpha": job.alpha, "lora_targets": job.lora_targets, "dora": job.dora,
                    "rslora": job.rslora},
    }


_OPTION = {"model": "--model", "data": "--data/--task", "quantizer": "--quantizer/--targets/--skip",
           "adapter": "--rank/--alpha/--lora-targets/--dora/--rslora"}


def check_same_run(out: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Raise unless a ``--resume`` now continues the run that ``out`` holds (same model, data, quantizer,
    adapters); the message names what changed and the options that would start a new run instead."""
    if not saved:
        return  # a run from before fingerprints: nothing to compare
    changed = []
    for part, option in _OPTION.items():
        if part in saved and saved[part] != now[part]:
            what = "the files changed" if _same_but_digest(saved[part], now[part]) else (
                f"was {json.dumps(saved[part], sort_keys=True)}, now {json.dumps(now[part], sort_keys=True)}")
            changed.append(f"{part} ({option}): {what}")
    if changed:
        raise CheckpointError(f"--resume continues the run in {out}, but {'; '.join(changed)}. Resume with the "
                              f"run's own options (leave those out), or start a new run: --overwrite replaces "
                              f"the one in {out}, or pass another --out")


def _same_but_digest(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return {k: v for k, v in a.items() if k != "sha256"} == {k: v for k, v in b.items() if k != "sha256"}


def checkpoint_damage(ck: Path) -> str | None:
    """Why checkpoint ``ck`` cannot be resumed from (a file missing, truncated or corrupted), or None. The
    torch files are zip archives: their CRCs are checked without unpickling anything."""
    from safetensors import safe_open

    for name in ("trainer_state.json",):
        try:
            json.loads((ck / name).read_text())
        except (OSError, ValueError) as e:
            return f"{name} cannot be read ({type(e).__name__}: {e})"
    for f in sorted(ck.glob("*.pt")) + sorted(ck.glob("*.pth")):
        try:
            with zipfile.ZipFile(f) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile, EOFError) as e:
            return f"{f.name} cannot be read ({type(e).__name__}: {e}; truncated?)"
        if bad is not None:
            return f"{f.name} is corrupted (its entry {bad} fails its CRC check)"
    for f in sorted(ck.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():  # noqa: SIM118 - safe_open has no iterator
                    st.get_tensor(k)
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ValueError
            return f"{f.name} cannot be read ({type(e).__name__}: {e})"
    return None


def damaged_checkpoint_error(ck: Path, why: str, out: Path) -> CheckpointError:
    """The error for a damaged ``ck``: which one, why, and how to resume from the one before it."""
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    step = int(ck.name.rsplit("-", 1)[-1])
    earlier = sorted(int(p.name.rsplit("-", 1)[-1]) for p in ck.parent.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                      if p.name.rsplit("-", 1)[-1].isdigit() and int(p.name.rsplit("-", 1)[-1]) < step)
    fix = (f"delete it (rm -r {ck}) and run the same command again to resume from {PREFIX_CHECKPOINT_DIR}-"
           f"{earlier[-1]}" if earlier else
           f"it is the only checkpoint: start the run again with --overwrite (--out {out})")
    return CheckpointError(f"checkpoint {ck} is damaged: {why}; {fix}")


def write_run_config(out: Path, options: dict[str, Any], fingerprint: dict[str, Any]) -> None:
    """``run_config.json``: the options (what ``--resume`` reuses) and the fingerprint, written atomically."""
    from modulora_core.files import staged_writes, write_json

    with staged_writes(out) as stage:
        write_json(stage / RUN_CONFIG, {**options, FINGERPRINT: fingerprint})


def read_run_config(out: Path) -> dict[str, Any]:
    """The saved options and fingerprint of the run in ``out`` (``{}`` when there is none)."""
    from modulora_core.files import read_json

    p = Path(out) / RUN_CONFIG
    return read_json(p, CheckpointError) if p.is_file() else {}

