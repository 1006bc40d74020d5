"""modulora_core.kernels: where kernels compile, and the eager fallback when compiling fails."""

from __future__ import annotations

import pytest
import torch

import modulora
from modulora_core import kernels, native
from modulora_core.kernels import ENV, compile_mode, kernel


def _double(x: torch.Tensor) -> torch.Tensor:
    return x * 2


def test_mode_reads_the_environment(monkeypatch) -> None:
    for value, mode in (("0", "0"), ("1", "1"), ("auto", "auto"), ("yes", "auto")):
        monkeypatch.setenv(ENV, value)
        assert compile_mode() == mode
    monkeypatch.setenv(ENV, "auto")  # auto: CUDA only, since CPU compilation costs seconds per shape
    k = kernel(_double)
    assert k.wants_compile(torch.device("cuda")) and not k.wants_compile(torch.device("cpu"))


def test_a_failing_compile_falls_back_to_eager_once(monkeypatch) -> None:
    calls = []

    def broken_compile(fn, **kw):
        def run(*a):
            calls.append(1)
            raise RuntimeError("no compiler here")
        return run

    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    k = kernel(_double)
    x = torch.arange(3.0)
    with pytest.warns(UserWarning, match="running it eagerly"):
        assert torch.equal(k(x), x * 2)
    assert torch.equal(k(x), x * 2) and len(calls) == 1  # not retried


def _spied_layer(monkeypatch, preset: str) -> tuple[torch.nn.Module, list]:
    """A ``[16, 64]`` QuantizedLinear of ``preset`` and the list of x shapes its ``matmul_small`` is called with."""
    from modulora_core import QuantizedLinear

    bq = modulora.get_preset(preset)
    layer = QuantizedLinear(bq.quantize(torch.randn(16, 64)), bq.quantizer)
    calls: list = []
    real = bq.quantizer.matmul_small
    monkeypatch.setattr(bq.quantizer, "matmul_small", lambda x, p: calls.append(x.shape) or real(x, p))
    return layer, calls


def test_decode_steps_take_matmul_small_only_where_kernels_compile(monkeypatch) -> None:
    layer, calls = _spied_layer(monkeypatch, "rtn-4bit")
    x = torch.randn(1, 64)
    monkeypatch.setenv(native.ENV, "0")  # the CPU kernels off: this is about torch.compile
    monkeypatch.setenv(ENV, "0")
    y_eager = layer(x)  # eager CPU: materialize + F.linear
    assert calls == []
    monkeypatch.setenv(ENV, "1")
    monkeypatch.setattr(kernels.torch, "compile", lambda fn, **kw: fn)  # "compiled" = the same function here
    y = layer(x)
    assert calls == [(1, 64)]
    torch.testing.assert_close(y, y_eager, rtol=1e-5, atol=1e-6)
    layer(torch.randn(5, 64))  # more rows than SMALL_BATCH: materialize
    assert calls == [(1, 64)]


# -- the CPU kernels (modulora_core.native) ----------------------------------------------------------------

native_only = pytest.mark.skipif(not native.available(), reason="no C compiler: the CPU kernels are not built")


def _packed(preset: str, out_f: int = 96, in_f: int = 256, **cfg):
    """A quantized ``[out_f, in_f]`` weight of ``preset`` (``cfg`` overrides fields of its config)."""
    bq = modulora.get_preset(preset)
    config = bq.config.model_copy(update=cfg) if cfg else bq.config
    g = torch.Generator().manual_seed(3)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    x = torch.randn(512, in_f, generator=g)
    h = x.T @ x if bq.quantizer.capabilities(config).needs_calibration else None
    return bq.quantizer, bq.quantizer.quantize_weight(w, config, h)


CASES = [("rtn-4bit", {}), ("rtn-4bit", {"symmetric": True}), ("rtn-4bit", {"group_size": -1}),
         ("nf4", {}), ("nf4-nodq", {}), ("fp4", {"blocksize": 128}),
         ("optq-4bit", {}), ("optq-4bit", {"desc_act": True, "group_size": 32}), ("optq-4bit", {"sym": False})]


@native_only
@pytest.mark.parametrize(("preset", "cfg", "shape"), [*((p, c, (96, 256)) for p, c in CASES),
                                                      ("quip#-2bit", {}, (96, 256)), ("quip#-2bit", {}, (576, 128)),
                                                      ("quip#-2bit", {}, (512, 64))])
def test_native_materialize_is_bit_identical_to_the_torch_code(monkeypatch, preset, cfg, shape) -> None:
    # quip#: the float32 transforms of integer-valued codewords are exact at these sizes, so equal to float64's
    # (96 = 8 x Paley 12 on the output side, 576 = 16 x Paley 36; 512: a power of two, whose lowest and top three
    # levels the kernel applies as the strip's rows arrive and leave)
    q, packed = _packed(preset, *shape, **cfg)
    monkeypatch.setenv(ENV, "0")  # plain torch
    ref = {dt: q.materialize(packed, dtype=dt) for dt in (torch.float32, torch.float16, torch.bfloat16)}
    ref_rows = q.materialize(packed, dtype=torch.float32, rows=slice(8, 40))
    monkeypatch.setenv(ENV, "auto")  # the CPU kernels
    for dt, want in ref.items():
        assert torch.equal(q.materialize(packed, dtype=dt), want), dt
    assert torch.equal(q.materialize(packed, dtype=torch.float32, rows=slice(8, 40)), ref_rows)
    assert torch.equal(ref_rows, ref[torch.float32][8:40])


@native_only
# out_f 90: the vector kernels' row tails (they take 4 rows, or 32 columns, a step); QuIP# needs multiples of 8
@pytest.mark.parametrize(("preset", "cfg", "out_f"), [*((p, c, o) for p, c in CASES for o in (96, 90)),
                                                      ("quip#-2bit", {}, 96)])
def test_native_decode_matches_the_float64_product(monkeypatch, preset, cfg, out_f) -> None:
    q, packed = _packed(preset, out_f, **cfg)
    dense = q.materialize(packed, dtype=torch.float64)  # (out, in)
    monkeypatch.setenv(ENV, "auto")
    so = native.lib()
    g = torch.Generator().manual_seed(5)
    for rows in (1, 3, native.MAX_ROWS):
        x = torch.randn(rows, dense.shape[1], generator=g)
        calls: list[str] = []
        for name in ("rtn4_gemv", "optq4_gemv", "nf4_gemv", "e8p_gemv"):  # prove the C kernel ran
            real = getattr(so, name)
            monkeypatch.setattr(so, name, lambda *a, _r=real, _n=name, _c=calls: _c.append(_n) or _r(*a))
        y = q.matmul(x, packed) if preset.startswith("quip") else q.matmul_small(x, packed)
        monkeypatch.undo()
        monkeypatch.setenv(ENV, "auto")
        assert calls, "the CPU kernel did not run"
        assert y.shape == (rows, dense.shape[0]) and y.dtype == torch.float32
        ref = x.double() @ dense.T
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-6


@native_only
def test_cpu_decode_steps_take_matmul_small_with_the_native_kernels(monkeypatch) -> None:
    layer, calls = _spied_layer(monkeypatch, "nf4")
    monkeypatch.setenv(ENV, "auto")  # no torch.compile on a CPU, but the C kernels
    y = layer(torch.ones(1, 64))
    assert calls == [(1, 64)]
    monkeypatch.setenv(ENV, "0")
    torch.testing.assert_close(y, layer(torch.ones(1, 64)), rtol=1e-5, atol=1e-6)
    assert calls == [(1, 64)]


def test_native_empty_is_an_ordinary_tensor() -> None:
    t = native.empty((3000, 1000))  # 12 MB: asks for huge pages
    t.fill_(2.0)
    assert t.shape == (3000, 1000) and t.dtype == torch.float32 and float(t.sum()) == 6e6


def test_without_a_compiler_the_plugins_run_their_torch_code(monkeypatch, tmp_path) -> None:
    def no_compiler(path):
        raise RuntimeError("no C compiler (cc, gcc or $CC) found")

    monkeypatch.setenv("MODULORA_CACHE", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(native, "_build", no_compiler)
    native._load.cache_clear()
    try:
        with pytest.warns(UserWarning, match="CPU kernels are unavailable"):
            assert native.lib() is None
        q, packed = _packed("rtn-4bit")
        assert q.matmul_small(torch.randn(1, 256), packed).shape == (1, 96)  # the torch GEMV
        assert not native.decodes_on(torch.device("cpu"))  # decode steps materialize again
    finally:
        native._load.cache_clear()  # the next caller loads the real build
