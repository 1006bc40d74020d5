"""The GPTQ v1 storage of one weight (see :mod:`.quantizer`): its family name, format version, and the check
that four tensors are it. Shared by the quantizer and the checkpoint reader/writer (:mod:`.gptq_format`),
so that neither imports the other to learn them: the quantizer imports ``gptq_format`` to export, never back.
"""

from __future__ import annotations

import torch

from modulora_core import CheckpointError

from .config import OPTQConfig
from .packing import packed_len

FAMILY = "optq"  # OPTQQuantizer.name
FORMAT_VERSION = 1  # OPTQQuantizer.format_version: GPTQ v1 tensors as they are


def check_tensors(tensors: dict[str, torch.Tensor], config: OPTQConfig, shape: tuple[int, int],
                  where: str = "optq packed weight") -> None:
    """Raise :class:`CheckpointError` unless ``tensors`` are the GPTQ v1 storage of an ``[N, K]`` weight."""
    n, k = shape
    gs = config.group_size if config.group_size > 0 else k
    g = -(-k // gs)
    want = {"qweight": ((packed_len(k, config.bits), n), (torch.int32,)),
            "qzeros": ((g, packed_len(n, config.bits)), (torch.int32,)),
            "scales": ((g, n), (torch.float16, torch.float32, torch.bfloat16)),  # .to(dtype) casts scales
            "g_idx": ((k,), (torch.int32, torch.int64))}
    if set(tensors) != set(want):
        raise CheckpointError(f"{where} {shape} has tensors {sorted(tensors)}; expected {sorted(want)}")
    for key, (shp, dtypes) in want.items():
        t = tensors[key]
        if tuple(t.shape) != shp or t.dtype not in dtypes:
            raise CheckpointError(f"{where}: {key} is {t.dtype} {tuple(t.shape)}; expected {dtypes[0]} {shp} "
                                  f"for a [{n}, {k}] weight with bits={config.bits}, group_size={config.group_size}")
    gi = tensors["g_idx"]
    if k and (int(gi.min()) < 0 or int(gi.max()) >= g):
        raise CheckpointError(f"{where}: g_idx values span [{int(gi.min())}, {int(gi.max())}]; expected groups "
                              f"0..{g - 1}")
