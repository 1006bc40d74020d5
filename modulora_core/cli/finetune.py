"""`modulora finetune`: quantize a model, train LoRA adapters, evaluate, save."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def finetune() -> None:
        """Quantize, finetune LoRA adapters, evaluate before/after, save."""
        raise typer.Exit(1)
