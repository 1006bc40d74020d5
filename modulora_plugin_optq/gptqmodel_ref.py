"""GPTQModel, the reference GPTQ implementation, run in a subprocess: for interop tests and benchmarks.

    python -m modulora_plugin_optq.gptqmodel_ref MODEL_DIR TOKENS.pt '[{"out_dir": "q4", "bits": 4}]'

quantizes the dense checkpoint ``MODEL_DIR`` with GPTQModel on the CPU in float32 on the token ids of
``TOKENS.pt`` (an ``[n, t]`` int64 tensor), once per job, and saves each GPTQ v1 checkpoint to its
``out_dir``; the last line of stdout is the JSON list of ``quantize()`` wall times. A subprocess, because
GPTQModel changes process-wide state on import (environment, logging) and needs ``os.cpu_count() >= 4``,
which a small machine is patched to report.

GPTQModel may live in another environment than ours (it pins its own torch): set ``MODULORA_GPTQMODEL_PYTHON``
to that environment's interpreter and the subprocess runs there, importing this repository's code from the
source tree. Unset, the subprocess is this interpreter.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# local directories only: no hub lookups
_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
PYTHON_ENV = "MODULORA_GPTQMODEL_PYTHON"  # the interpreter of an environment that has GPTQModel
_REPO = str(Path(__file__).resolve().parent.parent)  # this source tree, for another environment's interpreter


def gptqmodel_python() -> str:
    """The interpreter GPTQModel runs under: ``$MODULORA_GPTQMODEL_PYTHON``, else this one."""
    return os.environ.get(PYTHON_ENV) or sys.executable


def _subprocess_env() -> dict[str, str]:
    env = {**os.environ, **_ENV}
    if gptqmodel_python() != sys.executable:  # import our package from this tree, not that environment's copy
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH", "")) if p)
    return env


def gptqmodel_version() -> str | None:
    """GPTQModel's version in :func:`gptqmodel_python`'s environment, or None when it is not installed there
    (without importing it)."""
    if gptqmodel_python() == sys.executable:
        if importlib.util.find_spec("gptqmodel") is None:
            return None
        return importlib.metadata.version("gptqmodel")
    code = "import importlib.metadata as m\ntry: print(m.version('gptqmodel'))\nexcept m.PackageNotFoundError: pass"
    try:
        out = subprocess.run([gptqmodel_python(), "-c", code], capture_output=True, text=True, timeout=120)
    except OSError as e:
        raise RuntimeError(f"${PYTHON_ENV}={gptqmodel_python()!r} cannot be run: {e}") from e
    return out.stdout.strip() or None


def gptqmodel_available() -> bool:
    """Whether GPTQModel is installed for :func:`gptqmodel_python` (without importing it)."""
    return gptqmodel_version() is not None


@dataclass
class GPTQModelJob:
    """One GPTQModel quantization: its settings and the directory the checkpoint goes to.

    The defaults are plain GPTQ as in the paper (dampening 1%, GPTQModel's group-aware reordering off); a
    field set to None is left to GPTQModel's own default (7.x: dampening 5%, group-aware reordering on).
    """

    out_dir: str
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float | None = 0.01
    act_group_aware: bool | None = False
    mse: float | None = None  # GPTQModel's clipping search (its default: 0, off)

    def settings(self) -> dict[str, Any]:
        """The ``QuantizeConfig`` keyword arguments: every field but ``out_dir`` that is not None."""
        return {k: v for k, v in asdict(self).items() if k != "out_dir" and v is not None}


def gptqmodel_defaults(out_dir: str, bits: int) -> GPTQModelJob:
    """GPTQModel at its own defaults at ``bits`` (group 128, symmetric, act-order off, its dampening and order)."""
    return GPTQModelJob(out_dir, bits=bits, damp_percent=None, act_group_aware=None)


def quantize_with_gptqmodel(model_dir: str | os.PathLike, tokens_file: str | os.PathLike,
                            jobs: list[GPTQModelJob], *, batch_size: int = 8, threads: int = 0,
                            timeout: float = 7200) -> list[float]:
    """Run every job in one GPTQModel subprocess (it imports once); returns each ``quantize()`` wall time (s)."""
    cmd = [gptqmodel_python(), "-m", "modulora_plugin_optq.gptqmodel_ref", str(model_dir), str(tokens_file),
           json.dumps([asdict(j) for j in jobs]), "--batch-size", str(batch_size), "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_subprocess_env())
    if proc.returncode != 0:
        raise RuntimeError(f"GPTQModel failed ({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def patch_cpu_count() -> None:
    """Make ``os.cpu_count()`` report at least 4, which GPTQModel requires; call before importing it."""
    real = os.cpu_count() or 1
    os.cpu_count = lambda: max(real, 4)


def run_jobs(model_dir: str | os.PathLike, tokens: Any, jobs: list[GPTQModelJob], *,
             batch_size: int = 8) -> list[float]:
    """Quantize in this process (call :func:`patch_cpu_count` first): ``tokens`` ``[n, t]``; returns the
    ``quantize()`` wall time of each job in seconds."""
    import torch
    from gptqmodel import GPTQModel, QuantizeConfig

    calib = [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in tokens]
    times = []
    for job in jobs:
        qc = QuantizeConfig(**job.settings(), true_sequential=True, offload_to_disk=False)
        model = GPTQModel.load(str(model_dir), qc, dtype=torch.float32, device="cpu")  # bf16 on CPU: very slow
        t0 = time.perf_counter()
        model.quantize(calib, batch_size=batch_size, calibration_sort=None)
        times.append(time.perf_counter() - t0)
        model.save(job.out_dir)
        del model
    return times


def gptqmodel_layer(weight: Any, hessian: Any, job: GPTQModelJob) -> Any:
    """GPTQModel's own GPTQ solver on one weight ``[out, in]`` and Hessian ``[in, in]``: its fake-quantized
    weight ``[out, in]`` float32. In this process (call :func:`patch_cpu_count` first); for comparing the
    algorithm alone, with the calibration pipeline taken out."""
    import torch
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight.data = weight.detach().to(torch.float32).clone()
    qc = QuantizeConfig(**job.settings(), offload_to_disk=False)
    g = GPTQ(lin, qc)
    g.quantizer.configure(perchannel=True)
    # inputs X with X^T X = L L^T = H: GPTQModel then accumulates exactly our Hessian (up to its 2/n scale,
    # which dampening relative to the mean diagonal ignores)
    chol = torch.linalg.cholesky(hessian.detach().to(torch.float64)).to(torch.float32)
    g.add_batch(chol.T.contiguous(), None)
    return g.quantize(blocksize=128)[0].to(torch.float32)


def _main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("tokens", help="a torch.save'd [n, t] int64 tensor of token ids")
    ap.add_argument("jobs", help="JSON list of GPTQModelJob fields")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    a = ap.parse_args()
    patch_cpu_count()
    import torch

    if a.threads:
        torch.set_num_threads(a.threads)
    jobs = [GPTQModelJob(**j) for j in json.loads(a.jobs)]
    print(json.dumps(run_jobs(a.model_dir, torch.load(a.tokens), jobs, batch_size=a.batch_size)))


if __name__ == "__main__":
    _main()
