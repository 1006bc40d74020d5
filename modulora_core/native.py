"""CPU kernels in plain C (``native_kernels.c``, ``native_quip.c``), built on first use with the system C
compiler, loaded by ctypes.

They are the CPU half of :mod:`modulora_core.kernels`: ``torch.compile`` fuses a plugin's unpack and scale well
on a GPU, but inductor's CPU code for these gathers and short group reductions is scalar and slow, and torch's
own CPU int4 matmul (``_weight_int4pack_mm_for_cpu``) is fast only for bfloat16 inputs. So on a CPU the
first-party plugins' decode step (``matmul_small``; QuIP#'s fast path) and materialize (rtn, nf4 and optq 4-bit,
QuIP# 2-bit) call these kernels: one pass over the packed bytes (QuIP#: two, one per Hadamard side), AVX2 where
the CPU has it (hand-written for the decode GEMVs and the butterflies, by the compiler elsewhere:
``-O3 -march=native``), threaded with OpenMP (``torch.get_num_threads()``).

The shared library is cached under ``$MODULORA_CACHE`` (default ``~/.cache/modulora``), keyed by the source,
the compiler flags and the CPU's flags, so the ~1 s build happens once per machine. No compiler, a failed
build, ``MODULORA_COMPILE=0`` (plain torch everywhere) or ``MODULORA_NATIVE=0`` (these kernels alone off, e.g. to
time ``torch.compile``): :func:`lib` is None (a warning once for a failed build) and the plugins run their torch code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

import torch

from .kernels import compile_mode, compiles_on

_HERE = Path(__file__).parent
SOURCES = (_HERE / "native_kernels.c", _HERE / "native_quip.c")  # one library
HEADERS = (_HERE / "native_common.h",)
ENV = "MODULORA_NATIVE"
# -ffp-contract=off: no fused multiply-adds where the torch code rounds twice (NF4's double-quantized absmax)
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC", "-std=c99")
MAX_ROWS = 8  # native_kernels.c's MAX_ROWS: GEMV inputs of at most this many rows
SKIND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # scale dtypes the kernels read

_P, _I64, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
_SIGNATURES = {
    "rtn4_gemv": (_I, [_P, _I64, _I64, _P, _I64, _P, _I, _P, _I64, _I64, _P, _I]),
    "rtn4_dequant": (None, [_P, _I64, _P, _I, _P, _I64, _I64, _I64, _P, _I]),
    "optq4_gemv": (_I, [_P, _I64, _I64, _P, _P, _P, _I, _P, _I64, _I64, _I64, _P, _I]),
    "optq4_dequant_t": (_I, [_P, _P, _P, _I, _P, _I64, _I64, _I64, _I64, _I64, _P, _I]),
    "nf4_gemv": (_I, [_P, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _P, _I]),
    "nf4_dequant": (None, [_P, _P, _P, _P, _P, _P, _I64, _P, _I64, _I64, _P, _I]),
    "e8p_gemv": (None, [_P, _I64, _I64, _P, _P, _I64, _P, _I]),
    "quip2_materialize": (_I, [_P, _P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _P, _P, _P, _P, _I]),
}


def _cpu_key() -> str:
    try:  # -march=native: a library built for one CPU may not run on another sharing the cache
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(path: Path) -> None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler (cc, gcc or $CC) found")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:  # build aside, rename: concurrent builds are safe
        out = Path(tmp) / path.name
        res = subprocess.run([cc, *FLAGS, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
        if res.returncode:  # a compiler without OpenMP (Apple clang): single-threaded kernels, same results
            flags = [f for f in FLAGS if f != "-fopenmp"]
            res = subprocess.run([cc, *flags, *map(str, SOURCES), "-o", str(out)], capture_output=True, text=True)
        if res.returncode:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[:400]}")
        os.replace(out, path)


@functools.lru_cache(maxsize=1)
def _load() -> ctypes.CDLL | None:
    text = b"".join(f.read_bytes() for f in (*SOURCES, *HEADERS))
    key = hashlib.sha256(text + " ".join(FLAGS).encode() + _cpu_key().encode()).hexdigest()[:16]
    cache = Path(os.environ.get("MODULORA_CACHE") or Path.home() / ".cache" / "modulora")
    path = cache / f"native-kernels-{key}.so"
    try:
        if not path.exists():
            _build(path)
        so = ctypes.CDLL(str(path))
    except Exception as e:  # noqa: BLE001 - no compiler, read-only cache, foreign CPU: the torch code still works
        warnings.warn(f"ModuLoRA's CPU kernels are unavailable ({type(e).__name__}: {str(e)[:300]}); plugins use "
                      "their slower torch code", stacklevel=3)
        return None
    for name, (res, args) in _SIGNATURES.items():
        fn = getattr(so, name)
        fn.restype, fn.argtypes = res, args
    return so


def lib(*tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The loaded kernels if every tensor is a contiguous CPU tensor, and neither ``MODULORA_COMPILE`` nor
    ``MODULORA_NATIVE`` is ``0``."""
    if compile_mode() == "0" or os.environ.get(ENV, "1").strip() == "0":
        return None
    if not all(t.device.type == "cpu" and t.is_contiguous() for t in tensors):
        return None
    return _load()


def available() -> bool:
    """Whether the CPU kernels are built and loaded (building them if needed)."""
    return lib() is not None


def ptr(t: torch.Tensor | None) -> int | None:
    """``t``'s data pointer for a kernel argument (None: a NULL pointer)."""
    return None if t is None else t.data_ptr()


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``torch.empty`` on the CPU, asking Linux for huge pages when it is large (a dense materialized weight).

    A fresh tensor of tens of MiB is first touched page by page: with 4 KiB pages, those faults cost several
    times the kernel that fills it (measured: 64 MiB, 43 ms of faults against 10 ms in all with huge pages).
    ``madvise(MADV_HUGEPAGE)`` on the 2 MiB-aligned interior before the first write; the memory is the same.
    """
    t = torch.empty(shape, dtype=dtype, device="cpu")  # the kernels write CPU memory
    n = t.numel() * t.element_size()
    if n >= 4 * _HUGE and _madvise is not None:
        a, e = -(-t.data_ptr() // _HUGE) * _HUGE, (t.data_ptr() + n) // _HUGE * _HUGE
        _madvise(a, e - a, _MADV_HUGEPAGE)  # advice only: a kernel without THP ignores it
    return t


def _libc_madvise():  # noqa: ANN202 - a ctypes function or None
    if platform.system() != "Linux":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_HUGE, _MADV_HUGEPAGE = 2 << 20, 14
_madvise = _libc_madvise()


def threads() -> int:
    """OpenMP threads for a kernel call: torch's intra-op thread count."""
    return torch.get_num_threads()


def decodes_on(device: torch.device) -> bool:
    """Whether a decode step on ``device`` takes the plugin's ``matmul_small``: where kernels compile, and on a
    CPU with the C kernels (this module). Elsewhere its eager torch form takes more passes over
    the codes than materialize + one GEMV, so the caller materializes."""
    if compiles_on(device):
        return True
    return device.type == "cpu" and available()
