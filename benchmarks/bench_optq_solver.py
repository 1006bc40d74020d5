"""The GPTQ solver alone: ours against GPTQModel's ``GPTQ`` class on the same weights and the same Hessians.

End-to-end perplexity mixes the solver with the calibration pipeline, and at 3 bits a 135M model is fragile
enough that tiny differences early on move the final perplexity by several percent. This takes the pipeline
out: the Hessians ``X^T X`` of SmolLM2-135M's linears in a few decoder blocks are captured once (inputs of
the unquantized model, through the core's block-by-block pipeline), and both solvers quantize the same
weight against the same Hessian (GPTQModel's receives inputs ``X = L^T`` with ``L L^T = H``). The score
is each layer's output error ``tr((W - Q) H (W - Q)^T)``, ours over theirs.

    python -m benchmarks.bench_optq_solver     # blocks 0, 6, 14, 25; bits 3 and 4; three column orders

GPTQModel changes process-wide state when imported, so run this as its own process.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

import torch

from modulora_plugin_optq.gptqmodel_ref import GPTQModelJob, gptqmodel_layer, patch_cpu_count


def capture_hessians(n_samples: int, seq_len: int, blocks: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{linear name: (weight [out, in], Hessian [in, in])}`` for every linear of ``blocks``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.bench_optq import texts
    from modulora.finetune.pretrained import smollm2_dir
    from modulora_core.calibrate import quantize_blockwise
    from modulora_core.calibration_data import Calibration, calibration_tokens

    d = smollm2_dir()
    cal = Calibration([texts()[0]], n_samples=n_samples, seq_len=seq_len, tokenizer=AutoTokenizer.from_pretrained(d),
                      progress=False)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    wanted = {str(b) for b in blocks}
    names = [n for n, m in model.named_modules()
             if isinstance(m, torch.nn.Linear) and n.split(".layers.")[-1].split(".")[0] in wanted and ".layers." in n]
    store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def keep(name: str, h: torch.Tensor) -> None:  # no quantization: both solvers get the same inputs
        store[name] = (model.get_submodule(name).weight.detach().clone(), h)

    quantize_blockwise(model, names, calibration_tokens(cal), keep, cal)
    return store


def output_error(w: torch.Tensor, q: torch.Tensor, h: torch.Tensor) -> float:
    """``tr((W - Q) H (W - Q)^T)`` in float64."""
    e = (w - q).double()
    return float(torch.einsum("oi,ij,oj->", e, h.double(), e))


# the column order: GPTQ's own, act-order, or group-aware (GAR); GPTQModelJob's other settings are plain GPTQ's
ORDERS = {"plain": {}, "act-order": {"desc_act": True}, "group-aware": {"act_group_aware": True}}


def ours(w: torch.Tensor, h: torch.Tensor, bits: int, order: str) -> torch.Tensor:
    """Our plugin end to end on one layer (quantize, pack, materialize), at GPTQModelJob's settings."""
    from modulora_plugin_optq import OPTQConfig, OPTQQuantizer

    q = OPTQQuantizer()
    cfg = OPTQConfig(bits=bits, group_size=128, damp_percent=0.01, mse=0.0,
                     **{"act_group_aware": False, **ORDERS[order]})
    return q.materialize(q.quantize_weight(w, cfg, h), dtype=torch.float32)


def main() -> None:
    """Capture the Hessians, compare both solvers per configuration, print and write the section."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--blocks", type=int, nargs="+", default=[0, 6, 14, 25])
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    real_cpu_count = os.cpu_count
    patch_cpu_count()  # GPTQModel refuses fewer than 4 CPUs
    torch.set_num_threads(a.threads)
    store = capture_hessians(a.n_samples, a.seq_len, a.blocks)
    rows, data = [], []
    for bits in a.bits:
        for order in ORDERS:
            ratios, tot = [], [0.0, 0.0]
            for name, (w, h) in store.items():
                eo = output_error(w, ours(w, h, bits, order), h)
                et = output_error(w, gptqmodel_layer(w, h, GPTQModelJob("", bits=bits, **ORDERS[order])), h)
                ratios.append(eo / et)
                tot[0], tot[1] = tot[0] + eo, tot[1] + et
                data.append({"layer": name, "bits": bits, "order": order, "ours": eo, "gptqmodel": et})
            rows.append(f"| {bits} | {order} | {len(ratios)} | {tot[0] / tot[1]:.4f} | "
                        f"{statistics.median(ratios):.4f} | {min(ratios):.4f} - {max(ratios):.4f} |")
            print(rows[-1], flush=True)
    body = (f"SmolLM2-135M-Instruct, every linear of decoder blocks {', '.join(map(str, a.blocks))}; Hessians from "
            f"{a.n_samples} x {a.seq_len} calibration tokens (the docstrings' train split) through the unquantized "
            "model; symmetric, group 128, dampening 1%, min-max ranges, blocks of 128 columns, in three column "
            "orders (GPTQ's own, act-order, group-aware). Output error "
            "tr((W - Q) H (W - Q)^T) of our plugin (quantize, pack, materialize) over that of GPTQModel's `GPTQ` "
            "class on the same weight and Hessian: 1 means the same solver.\n\n"
            "| bits | order | layers | total error ours / theirs | median per layer | range per layer |\n"
            "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        os.cpu_count = real_cpu_count  # the section's machine line reports the real count

        command = " ".join(["python -m benchmarks.bench_optq_solver", *map(shlex.quote, sys.argv[1:])])
        write_section("optq-solver", "OPTQ solver alone vs GPTQModel's, same weights and Hessians", command, body)
        write_data("optq-solver", command, data)


if __name__ == "__main__":
    main()
