"""`modulora finetune`: quantize a causal LM, train LoRA adapters on real text, evaluate, save.

With no arguments it runs the built-in demo: a small Llama-architecture model (random initialisation,
byte-level tokenizer: nothing is downloaded) quantized with ``rtn-4bit``, LoRA-finetuned on the docstrings of
Python's standard library, with held-out perplexity before and after.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

DEMO_MODEL = "demo-llama"


def _demo_model_and_tokenizer(seed: int) -> tuple[Any, Any]:
    """A 4-layer Llama (hidden 256, ~4M parameters) and ByT5's byte tokenizer, which needs no files."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tok = ByT5Tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).float(), tok


def _load_model_and_tokenizer(model: str, seed: int) -> tuple[Any, Any]:
    if model == DEMO_MODEL:
        return _demo_model_and_tokenizer(seed)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    except OSError as e:
        raise typer.BadParameter(f"cannot load model {model!r}: {e}", param_hint="--model") from e
    return m, tok


def _token_blocks(texts: list[str], tok: Any, seq_len: int) -> Any:
    """Concatenate ``texts`` (EOS-separated) and cut into ``[n, seq_len]`` token blocks."""
    import torch

    ids: list[int] = []
    eos = tok.eos_token_id if tok.eos_token_id is not None else 0
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False).input_ids)
        ids.append(eos)
    n = len(ids) // seq_len
    if n == 0:
        raise typer.BadParameter(f"not enough text for one block of {seq_len} tokens", param_hint="--seq-len")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _perplexity(model: Any, blocks: Any, batch_size: int) -> float:
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch_size):
            b = blocks[i: i + batch_size]
            loss = model(input_ids=b, labels=b).loss
            n = b.numel() - b.shape[0]  # labels shift by one inside the model
            total += float(loss) * n
            count += n
    model.train()
    return math.exp(total / count)


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def run_finetune(*, model: str, quantizer: str, out: Path, steps: int, lr: float, batch_size: int,
                 seq_len: int, rank: int, alpha: float, dropout: float, chunk_rows: int | None, seed: int,
                 eval_blocks: int) -> dict[str, Any]:
    """The job behind the command; returns the metrics it also writes to ``out/metrics.json``."""
    import torch
    from rich.console import Console
    from tqdm.auto import tqdm

    import modulora
    from modulora_core.data import docstring_splits

    console = Console(stderr=True)
    torch.manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise typer.BadParameter(f"output directory {out} is not writable", param_hint="--out")
    t0 = time.perf_counter()
    console.print(f"[bold]model[/] {model}  [bold]quantizer[/] {quantizer}  [bold]out[/] {out}")
    base, tok = _load_model_and_tokenizer(model, seed)
    splits = docstring_splits()
    to_text = lambda d: f"{d.qualname}{d.signature}\n{d.doc}"  # noqa: E731
    train = _token_blocks([to_text(d) for d in splits["train"]], tok, seq_len)
    val = _token_blocks([to_text(d) for d in splits["validation"]], tok, seq_len)[:eval_blocks]
    console.print(f"data: stdlib docstrings, {len(train)} train / {len(val)} validation blocks of {seq_len}")

    ppl_dense = _perplexity(base, val, batch_size)
    lora = modulora.LoraConfig(r=rank, alpha=alpha, dropout=dropout)
    model_q = modulora.load(base, quantizer, lora=lora, chunk_rows=chunk_rows)
    ppl_before = _perplexity(model_q, val, batch_size)
    console.print(f"validation perplexity: dense {ppl_dense:.3f}, quantized before finetuning {ppl_before:.3f}")

    params = [p for p in model_q.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model_q.train()
    with tqdm(range(steps), desc="finetune", unit="step") as bar:
        for _ in bar:
            idx = torch.randint(len(train), (batch_size,), generator=gen)
            b = train[idx]
            loss = model_q(input_ids=b, labels=b).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    ppl_after = _perplexity(model_q, val, batch_size)

    adapter_dir, base_dir = out / "adapter", out / "base"
    modulora.save_adapter(model_q, adapter_dir)
    modulora.save_quantized(model_q, base_dir)
    metrics = {
        "model": model, "quantizer": quantizer, "steps": steps, "lr": lr, "batch_size": batch_size,
        "seq_len": seq_len, "lora_r": rank, "lora_alpha": alpha, "seed": seed,
        "trainable_parameters": sum(p.numel() for p in params),
        "validation_perplexity": {"dense": ppl_dense, "before": ppl_before, "after": ppl_after},
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "adapter": str(adapter_dir), "quantized_base": str(base_dir),
    }
    _write_json_atomic(out / "metrics.json", metrics)
    console.print(
        f"\n[bold]validation perplexity[/] (stdlib docstrings, per token): dense {ppl_dense:.3f} | "
        f"{quantizer} before finetuning {ppl_before:.3f} | after {steps} LoRA steps [bold]{ppl_after:.3f}[/]\n"
        f"adapter (PEFT format): {adapter_dir}\nquantized base: {base_dir}\nmetrics: {out / 'metrics.json'}\n"
        "use it from Python:\n"
        f"  m = modulora.load({str(base_dir)!r}); modulora.load_adapter(m, {str(adapter_dir)!r})"
    )
    return metrics


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune(
        model: Annotated[str, typer.Option(help=f"Hugging Face model dir or id, or '{DEMO_MODEL}'")] = DEMO_MODEL,
        quantizer: Annotated[str, typer.Option(help="quantizer preset (see `modulora plugins`)")] = "rtn-4bit",
        out: Annotated[Path, typer.Option(help="output directory")] = Path("modulora-out"),
        steps: Annotated[int, typer.Option(min=1)] = 150,
        lr: Annotated[float, typer.Option(min=0.0)] = 3e-3,
        batch_size: Annotated[int, typer.Option(min=1)] = 8,
        seq_len: Annotated[int, typer.Option(min=8)] = 128,
        rank: Annotated[int, typer.Option(min=1, help="LoRA rank r")] = 16,
        alpha: Annotated[float, typer.Option(help="LoRA alpha (scaling alpha/r)")] = 32.0,
        dropout: Annotated[float, typer.Option(min=0.0, max=0.99)] = 0.0,
        chunk_rows: Annotated[int | None, typer.Option(min=1, help="materialize W in row tiles")] = None,
        seed: Annotated[int, typer.Option()] = 0,
        eval_blocks: Annotated[int, typer.Option(min=1, help="validation blocks to score")] = 64,
    ) -> None:
        """Quantize a model, finetune LoRA adapters on stdlib docstrings, evaluate before/after, save."""
        import modulora

        try:
            run_finetune(model=model, quantizer=quantizer, out=out, steps=steps, lr=lr, batch_size=batch_size,
                         seq_len=seq_len, rank=rank, alpha=alpha, dropout=dropout, chunk_rows=chunk_rows,
                         seed=seed, eval_blocks=eval_blocks)
        except modulora.ModuLoRAError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from e
