"""benchmarks/plots.py: each figure from small synthetic results, a valid PNG in a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="matplotlib is in the dev extra: pip install -e '.[dev]'")

from benchmarks import plots  # noqa: E402
from benchmarks.report import write_data  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GiB = 1 << 30


def _memory_rows() -> list[dict]:
    rows = []
    for params, scale in ((135e6, 1.0), (470e6, 1.5), (1.49e9, 3.0)):
        for kind, extra in (("ModuLoRA 2-bit", 0.0), ("dense LoRA (PEFT)", 1.0),
                            ("QLoRA (PEFT + bitsandbytes NF4)", 0.2)):
            rows.append({"model": f"m{params:.0f}", "params": int(params), "kind": kind, "quantizer": kind,
                         "predicted": int((scale + extra) * GiB), "measured": int((scale + extra) * 1.05 * GiB),
                         "checkpointing": False, "chunk_rows": None})
    # a row with options is left out of the plot, not an error
    rows.append({**rows[0], "checkpointing": True})
    return rows


def _layer_rows() -> dict:
    steps = [{"config": "dense nn.Linear + LoRA", "kind": "dense", "ratio_vs_dense": 1.0, "dim": 64},
             {"config": "ModuLoRA rtn-4bit, chunk_rows=none", "kind": "chunk=none", "ratio_vs_dense": 1.1},
             {"config": "ModuLoRA quip#-2bit, fast path", "kind": "quip#-2bit:fast", "ratio_vs_dense": 2.5}]
    return {"steps": steps, "materialize": [{"quantizer": "rtn-4bit", "materialize_gbps": 1.2, "copy_gbps": 6.0}]}


def _finetune_rows() -> list[dict]:
    return [{"config": "rtn-4bit", "loss_before": 2.5, "loss_after": 1.9, "rougeL_before": 0.1,
             "rougeL_after": 0.3, "s_per_step": 1.0, "peak_rss_mib": 900},
            {"config": "qlora-bnb-nf4", "loss_before": 2.4, "loss_after": None, "rougeL_before": None,
             "rougeL_after": None, "s_per_step": 1.0, "peak_rss_mib": 900}]


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize("fn, rows", [(plots.memory_plot, _memory_rows()), (plots.speed_plot, _layer_rows()),
                                      (plots.finetune_plot, _finetune_rows())])
def test_each_plot_writes_a_png(tmp_path: Path, fn, rows) -> None:
    out = fn({"rows": rows, "command": "synthetic"}, tmp_path / "img" / "x.png")
    assert out == tmp_path / "img" / "x.png" and _is_png(out)


def test_plots_without_rows_draw_nothing(tmp_path: Path) -> None:
    for fn in (plots.memory_plot, plots.speed_plot, plots.finetune_plot):
        assert fn({"rows": []}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_make_figures_draws_only_what_has_data(tmp_path: Path) -> None:
    data, img = tmp_path / "data", tmp_path / "img"
    assert plots.make_figures(data, img, quality=False) == []
    write_data("memory", "synthetic", _memory_rows(), directory=data)
    write_data("layer-quick", "synthetic --quick", _layer_rows(), directory=data)  # the quick run stands in
    # the scale demonstration's row joins the memory figure
    seven_b = {**_memory_rows()[0], "params": int(6.7e9), "batch": 1, "seq": 128}
    write_data("memory-scale", "synthetic --scale", [seven_b], directory=data)
    drawn = plots.make_figures(data, img, quality=False)
    assert [name for name, _, _ in drawn] == ["memory", "speed"]
    assert all(_is_png(path) and path.parent == img for _, path, _ in drawn)
    assert "synthetic --scale" in drawn[0][2] and "synthetic --quick" in drawn[1][2]
