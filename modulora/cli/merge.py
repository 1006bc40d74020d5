"""`modulora merge`: fold an adapter into its base. By default a dense Hugging Face model
(``merge_and_unload``; ``AutoModelForCausalLM.from_pretrained`` loads it); with ``--requantize`` the merged
weights are quantized again with the base's own quantizer (``modulora.merge_requantized``) and stay packed."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .common import say, user_errors, writable_dir


def register(app: typer.Typer) -> None:
    @app.command()
    def merge(
        model: Annotated[str, typer.Option(help="the base: a quantized base directory or a dense model")],
        adapter: Annotated[str, typer.Option(help="adapter directory (PEFT format)")],
        out: Annotated[Path, typer.Option(help="directory for the merged model")],
        requantize: Annotated[bool, typer.Option("--requantize", help="quantize W + ΔW again with the base's "
                                                 "quantizer and save the packed model (a quantized base "
                                                 "only)")] = False,
        calibration: Annotated[str, typer.Option(help="with --requantize, for quantizers that calibrate: a "
                                                 "built-in task name or a data file")] = "docsum",
        calibration_samples: Annotated[int, typer.Option(min=1, help="calibration examples")] = 32,
        seq_len: Annotated[int, typer.Option(min=8, help="tokens per calibration example")] = 256,
    ) -> None:
        """Merge ``W + ΔW`` (LoRA, DoRA) into a dense model, or with --requantize into a packed one."""
        import modulora
        from modulora.finetune import models
        from modulora_core.errors import ModuLoRAError

        from .quantize import calibration_texts

        with user_errors():
            model = models.resolve_model(model)
            out = writable_dir(out)
            tok = models.load_tokenizer(model)
            if requantize and not models.is_quantized(model):
                raise ModuLoRAError(f"--requantize merges into the base's quantizer, but {model} is a dense "
                                    f"model: merge without --requantize, then `modulora quantize` the result")
            peft_model = models.load_for_inference(model, adapter)
            if requantize:
                preset = models.preset_of(peft_model)
                cal = None
                if modulora.get_preset(preset).capabilities().needs_calibration:
                    cal = models.calibration_for(calibration_texts(calibration), tok, calibration_samples, seq_len)
                merged = modulora.merge_requantized(peft_model, calibration=cal)
                modulora.save_quantized(merged, out, tokenizer=tok)
                say(f"merged and quantized again with {preset}: AutoModelForCausalLM.from_pretrained({str(out)!r}) "
                    f"after `import modulora`, or modulora.load({str(out)!r})")
            else:
                dense = modulora.dequantize(peft_model, merge=True)  # merge_and_unload, then every base dense
                dense.save_pretrained(out)
                tok.save_pretrained(out)
                say(f"merged dense model saved: AutoModelForCausalLM.from_pretrained({str(out)!r})")
        typer.echo(str(out))
