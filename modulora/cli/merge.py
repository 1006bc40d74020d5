"""`modulora merge`: fold an adapter into its base and write a dense Hugging Face model
(``AutoModelForCausalLM.from_pretrained`` loads it), optionally quantized again."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import is_quantized_dir, load_dense, load_tokenizer, say, user_errors, writable_dir


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        model: Annotated[str, typer.Option(help="the base: a quantized base directory or a dense model")],
        adapter: Annotated[str, typer.Option(help="adapter directory (PEFT format)")],
        out: Annotated[Path, typer.Option(help="directory for the merged model")],
        requantize: Annotated[str | None, typer.Option(help="quantize the merged model with this preset "
                                                       "and save the packed base instead")] = None,
    ) -> None:
        """Merge ``W + (alpha/r) B A`` into a dense model (base materialized from its packed form)."""
        import modulora

        from .common import load_for_inference

        with user_errors():
            out = writable_dir(out)
            tok = load_tokenizer(model)
            if is_quantized_dir(model):
                m = load_for_inference(model, adapter)
                dense = modulora.dequantize(m, merge=True)
            else:  # a dense base: stock PEFT merges
                from peft import PeftModel

                dense = PeftModel.from_pretrained(load_dense(model), adapter).merge_and_unload()
            dense.config.tie_word_embeddings = getattr(dense.config, "tie_word_embeddings", False)
            if requantize:
                q = modulora.load(dense, requantize)
                modulora.save_quantized(q, out, tokenizer=tok)
                say(f"merged and quantized again with {requantize}: load it with modulora.load({str(out)!r})")
            else:
                dense.save_pretrained(out)
                tok.save_pretrained(out)
                say(f"merged dense model saved: AutoModelForCausalLM.from_pretrained({str(out)!r})")
        typer.echo(str(out))
