"""The code books of bitsandbytes' 4-bit formats and of its 8-bit map for double quantization.

Values are float32, as bitsandbytes stores and multiplies them, so that our dequantized weights equal its
own bit for bit. Each book is built once per device and cached.
"""

from __future__ import annotations

import functools

import torch

# The 16 NormalFloat levels: quantiles of N(0, 1) normalized to [-1, 1], with an exact zero (QLoRA).
# Written with the digits of their float32 values so that the table is the one bitsandbytes multiplies by.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)

# bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit, exponent bias 2) in code order, before dividing
# by the largest magnitude (12). Code 8 is -0: it decodes to 0 like code 0.
FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)

QUANT_TYPES = ("nf4", "fp4")
NESTED_BLOCKSIZE = 256  # weights per block of the 8-bit double quantization of absmax (bitsandbytes' value)


@functools.cache
def _levels_cpu(quant_type: str) -> torch.Tensor:
    if quant_type == "nf4":
        return torch.tensor(NF4_LEVELS, dtype=torch.float32, device="cpu")
    if quant_type == "fp4":
        raw = torch.tensor(FP4_RAW, dtype=torch.float32, device="cpu")
        return raw / raw.abs().max()  # float32 division, as bitsandbytes normalizes its table
    raise ValueError(f"unknown 4-bit quant_type {quant_type!r}; expected one of {QUANT_TYPES}")


@functools.cache
def _levels_on(quant_type: str, device: torch.device) -> torch.Tensor:
    return _levels_cpu(quant_type).to(device)


def levels(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``[16]`` float32 values that 4-bit codes 0..15 stand for (``"nf4"`` or ``"fp4"``)."""
    return _levels_on(quant_type, torch.device(device))


@functools.cache
def _byte_table_on(quant_type: str, device: torch.device) -> torch.Tensor:
    byte = torch.arange(256, device="cpu")
    book = _levels_cpu(quant_type)
    return torch.stack((book[byte >> 4], book[byte & 0xF]), dim=-1).to(device)  # (256, 2)


def byte_table(quant_type: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[256, 2]`` float32: the two values a packed byte stands for (high nibble first), so decoding is
    one gather per byte instead of unpacking nibbles into an index tensor."""
    return _byte_table_on(quant_type, torch.device(device))


@functools.cache
def _encoder_cpu(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    book = _levels_cpu(quant_type)
    # stable, so that FP4's +0 (code 0) sorts before -0 (code 8) and a value of 0 encodes as code 0
    order = torch.argsort(book, stable=True)
    sorted_book = book[order]
    mids = (sorted_book[:-1] + sorted_book[1:]) / 2  # float32 midpoints: the encoding thresholds
    return mids, order


def encoder(quant_type: str, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(thresholds [15], order [16])``: a value ``x`` in ``[-1, 1]`` encodes as
    ``order[bucketize(x, thresholds)]`` (a value exactly on a threshold takes the lower level)."""
    mids, order = _encoder_cpu(quant_type)
    return mids.to(device), order.to(device)


@functools.cache
def _dynamic_map_cpu() -> torch.Tensor:
    # bitsandbytes' signed dynamic 8-bit type (Dettmers 2016, "8-bit approximations"): for exponents
    # 10^-6 .. 10^0, 2^i evenly spaced means in [0.1, 1] times the exponent, both signs; plus 0 and 1.
    values: list[float] = []
    for i in range(7):
        edges = torch.linspace(0.1, 1.0, 2**i + 1, dtype=torch.float32, device="cpu")
        means = (edges[:-1] + edges[1:]) / 2.0  # (2^i,)
        scale = 10.0 ** (i - 6)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    return torch.tensor(sorted(values), dtype=torch.float32, device="cpu")  # (256,), ascending


@functools.cache
def _dynamic_map_on(device: torch.device) -> torch.Tensor:
    return _dynamic_map_cpu().to(device)


def dynamic_map(device: torch.device | str = "cpu") -> torch.Tensor:
    """bitsandbytes' ``create_dynamic_map()``: ``[256]`` ascending float32 values in ``[-0.993, 1]``."""
    return _dynamic_map_on(torch.device(device))
