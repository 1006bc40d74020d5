"""Coverage across architectures: the share of decoder-block matrix weights each preset packs.

For each tiny random model of :mod:`modulora_core.testing.architectures` (19 transformers causal LMs:
dense, GPT-2 Conv1D, mixture-of-experts with fused experts), quantize with the preset and report the
packed share of the decoder-block matrix weights, what stays dense (routers, on purpose), the packed
experts, and the relative logits error against the dense model on random tokens.

    python -m benchmarks.bench_architectures                 # rtn-4bit and rtn-2bit, all architectures
    python -m benchmarks.bench_architectures --presets nf4   # any presets, comma-separated
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
import warnings

import torch


def row(arch: str, preset: str) -> dict:
    import modulora
    from modulora_core.coverage import coverage
    from modulora_core.qlinear import QuantizedLinear
    from modulora_core.testing.architectures import VOCAB, tiny_model

    model = tiny_model(arch)
    ids = torch.randint(3, VOCAB, (4, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    cal = [ids[i] for i in range(4)] if preset.startswith(("optq", "quip")) else None
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        q = modulora.load(model, preset, lora=None, calibration=cal)
    secs = time.perf_counter() - t0
    with torch.no_grad():
        got = q(input_ids=ids).logits
    cov = coverage(q)
    experts = sum(1 for n, m in q.named_modules() if isinstance(m, QuantizedLinear) and ".experts." in n)
    dense_warned = any("stay dense" in str(w.message) for w in caught)
    return {"arch": arch, "model": type(q).__name__, "preset": preset, "packed_share": cov.fraction,
            "packed_share_quantizable": cov.fraction_of_quantizable, "by_design": sorted(cov.by_design),
            "dense": sorted(cov.dense), "dense_warning": dense_warned, "expert_matrices_packed": experts,
            "logits_rel_err": float((got - ref).norm() / ref.norm()), "quantize_s": round(secs, 2)}


def table(rows: list[dict]) -> str:
    out = ["| architecture | model class | preset | packed share | of quantizable | dense on purpose | "
           "left dense | expert matrices packed | logits rel. err |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kept = ", ".join(sorted({n.split(".")[-2] for n in r["by_design"]})) or "—"
        out.append(f"| {r['arch']} | {r['model']} | {r['preset']} | {100 * r['packed_share']:.2f}% | "
                   f"{100 * r['packed_share_quantizable']:.1f}% | {kept} | {len(r['dense']) or '—'} | "
                   f"{r['expert_matrices_packed'] or '—'} | {r['logits_rel_err']:.3f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    from modulora_core.testing.architectures import ARCHS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default="rtn-4bit,rtn-2bit")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    rows = [row(arch, p) for p in a.presets.split(",") for arch in sorted(ARCHS)]
    body = ("Tiny random models (2 blocks, width 64; MoE: 4 experts, top-2) of every architecture in "
            "`modulora_core/testing/architectures.py`. Packed share: packed weights over all decoder-block "
            "matrix weights (routers included); of quantizable: routers left out. Left dense: matrices no "
            "quantizer packs (each would be named by a warning). Logits error: against the dense model, "
            "random tokens, random weights (higher than on a trained model).\n\n" + table(rows))
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        cmd = " ".join(["python -m benchmarks.bench_architectures", *(shlex.quote(x) for x in sys.argv[1:]
                                                                       if x != "--no-write")])
        write_data("architectures", cmd, rows)
        write_section("architectures", "Architectures: what each preset packs", cmd, body)


if __name__ == "__main__":
    main()
