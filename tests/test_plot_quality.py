"""benchmarks/plot_quality.py on synthetic benchmark rows: which run it picks, and that it draws a PNG."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from benchmarks.plot_quality import quality_plot, quality_rows  # noqa: E402
from benchmarks.report import write_data  # noqa: E402


def _row(name: str, family: str, bits: float, ppl: float, tokens: int = 0, **extra) -> dict:
    return {"name": name, "family": family, "bits_per_weight": bits, "perplexity": ppl,
            "calibration_tokens": tokens, **extra}


def _quip_rows(tokens: int, scale: float = 1.0) -> list[dict]:
    rows = [_row("unquantized", "unquantized", 32, 15.4, tokens)]
    for fam, base in (("quip#", 16.0), ("optq", 19.0), ("rtn", 25.0), ("hqq", 21.0)):
        rows += [_row(f"{fam}-{b}bit", fam, b + 0.2, scale * base * 4 ** (4 - b), tokens) for b in (2, 3, 4)]
    return rows + [_row("nf4", "nf4", 4.127, 19.0, tokens), _row("bitsandbytes-nf4", "bitsandbytes", 4.127, 19.1)]


def test_no_data_gives_none(tmp_path: Path) -> None:
    assert quality_plot(tmp_path / "q.png", data_dir=tmp_path) is None
    assert not (tmp_path / "q.png").exists()


def test_plot_uses_the_most_complete_run_and_gptqmodel_medians(tmp_path: Path) -> None:
    write_data("quipsharp-quick", "quick", _quip_rows(8192, scale=2.0), directory=tmp_path)
    write_data("quipsharp", "full", _quip_rows(32768), directory=tmp_path)
    partial = [_row("quip#-4bit", "quip#", 4.0, 15.6, 131072)]  # more calibration, but one preset only
    write_data("quipsharp-quick-n-cal512-quipsharp-4bit", "partial", partial, directory=tmp_path)
    ref = [_row("gptqmodel-3bit-g128", "gptqmodel", 3.2, p, calibration_set=i) for i, p in enumerate((60, 62, 70))]
    write_data("optq-quick", "optq", ref + [_row("optq-3bit-g128", "optq", 3.2, 65)], directory=tmp_path)
    main, gptqmodel = quality_rows(tmp_path)
    assert {r["calibration_tokens"] for r in main if r["family"] != "bitsandbytes"} == {32768}
    assert [r["family"] for r in gptqmodel] == ["gptqmodel"] * 3
    out = quality_plot(tmp_path / "plots" / "quality.png", data_dir=tmp_path)
    assert out == tmp_path / "plots" / "quality.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
