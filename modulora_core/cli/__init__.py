"""The ``modulora`` command: one module per command group, assembled here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="modulora",
    help="Finetune LLMs stored in 2, 3 or 4 bits by any quantizer (ModuLoRA).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # imported here so `modulora --help` stays fast and each group lives in its own module
    from . import finetune, plugins

    app.add_typer(plugins.app, name="plugins")
    finetune.register(app)


def main() -> None:
    """Console-script entry point."""
    _register()
    app()
