"""benchmarks/bench_merge.py: its tables on synthetic rows, and one preset end to end on a tiny model."""

from __future__ import annotations

import math

import torch

from benchmarks.bench_merge import tables


def _row(preset: str, a: float, b: float, c: float, d: float) -> dict:
    pair = lambda x: (x, math.exp(x))  # noqa: E731
    return {"preset": preset, "bits_per_weight": 4.25, "adapter": pair(a), "dense_merge": pair(b),
            "requant_merge": pair(c), "base": pair(d), "dense_merge_logits_rel": 2e-7,
            "requant_merge_logits_rel": 0.05, "dense_merge_s": 0.4, "requant_merge_s": 12.0,
            "adapter_mib": 100.0, "dense_merge_mib": 500.0, "requant_merge_mib": 99.0}


def test_tables_give_deltas_ratios_and_kept_gain() -> None:
    text = tables([_row("rtn-4bit", 2.0, 2.0, 2.25, 3.0), {"preset": "quip#-2bit", "error": "boom"}], (1.5, 4.48))
    line = next(x for x in text.splitlines() if x.startswith("| rtn-4bit | +"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # (b) delta, (b) ratio, (b) logits, (c) delta, (c) ratio, (c) logits, kept, (d) ratio
    assert cells[1:9] == ["+0.00000", "1.0000", "2.0e-07", "+0.2500", f"{math.exp(0.25):.3f}", "0.050", "75%",
                          f"{math.exp(1.0):.3f}"]
    assert "| 100 / 500 / 99 |" in line
    assert "- quip#-2bit: failed: boom" in text and "GGUF Q4_1-dequantized" in text


def test_one_preset_end_to_end_on_a_tiny_model(tmp_path) -> None:
    """run_preset on the tiny built-in model: the dense merge matches the adapter, the requantized one is packed."""
    from benchmarks.bench_merge import batches, run_preset
    from modulora.finetune.tiny import tiny_llama_dir

    path = tiny_llama_dir(tmp_path)
    g = torch.Generator().manual_seed(0)
    ds = [{"input_ids": (ids := torch.randint(3, 200, (24,), generator=g).tolist()), "labels": ids}
          for _ in range(8)]
    val = batches(ds, 0, 4)
    row = run_preset("rtn-4bit", path, val, batches(ds[:1], 0, 1)[0], batches(ds, 0, 4) * 3, None)
    assert row["still_packed"] and row["dense_merge_logits_rel"] < 1e-4
    assert abs(row["dense_merge"][0] - row["adapter"][0]) < 1e-4
    assert row["train_loss"][-1] < row["train_loss"][0]
