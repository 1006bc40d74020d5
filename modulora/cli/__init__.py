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

# Command modules, each with ``register(app)``, in the order `modulora --help` lists them. Imported lazily
# (in _register) so `modulora --help` stays fast. To add a group, add its module name here.
COMMANDS = ("finetune", "quantize", "evaluate", "generate", "merge")
# Optional groups that other work adds; listed here so the place is clear, skipped while absent:
#   plan — the memory planner (modulora/cli/plan.py, `register(app)`).
OPTIONAL_COMMANDS = ("plan",)


_registered = False


def _register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import importlib

    from . import plugins

    app.add_typer(plugins.app, name="plugins")
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name}").register(app)
    for name in OPTIONAL_COMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            continue
        mod.register(app)


def main() -> None:
    """Console-script entry point (also ``python -m modulora``)."""
    _register()
    app()
