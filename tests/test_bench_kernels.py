"""benchmarks/bench_kernels.py: interleaved rounds, the rows of a small weight, the goal lines."""

from __future__ import annotations

import os

from benchmarks.bench_kernels import goals, interleaved, kernel_rows, paired
from modulora_core import kernels


def test_interleaved_times_each_call_in_its_mode_and_its_rounds() -> None:
    seen: dict[str, list[str | None]] = {"a": [], "b": []}

    def record(name: str):  # noqa: ANN202 - a zero-argument callable
        return lambda: seen[name].append(os.environ.get(kernels.ENV))

    t = interleaved({"a": ("torch", record("a"), 3), "b": (None, record("b"), 1)})
    assert len(t["a"]) == 3 and len(t["b"]) == 1 and min(t["a"] + t["b"]) >= 0
    assert seen["a"] == ["0"] * 4  # one warm-up, then three rounds, each under MODULORA_COMPILE=0
    assert len(seen["b"]) == 2 and seen["b"][0] == os.environ.get(kernels.ENV)


def test_kernel_rows_and_goals_of_a_small_weight() -> None:
    row = kernel_rows("rtn-4bit", 64, 1, ("torch", "native"))
    for key in ("dense_ms", "copy_gbps", "materialize_linear_ms", "materialize_gbps_torch", "materialize_gbps_native",
                "decode_ms_torch", "decode_ms_native", "materialize_vs_copy_native", "decode_vs_dense_native"):
        assert row[key] is not None and row[key] > 0, key
    text = goals([row])
    assert "rtn-4bit materialize" in text and "rtn-4bit decode" in text and "(goal >= 0.5:" in text


def test_paired_is_the_median_of_the_per_round_ratios() -> None:
    assert paired([2.0, 9.0, 4.0], [1.0, 3.0, 1.0]) == 3.0  # ratios 2, 3, 4; the ratio of medians would be 4
