"""`modulora plugins`: list installed quantizer plugins; `modulora plugins check NAME`: conformance kit."""

from __future__ import annotations

import json
from dataclasses import asdict

import typer

app = typer.Typer(help="List quantizer plugins and check them with the conformance kit.", invoke_without_command=True)


@app.callback()
def plugins(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the plugin list as JSON."),
) -> None:
    """List installed quantizer plugins: distribution, version, families, presets and load errors."""
    if ctx.invoked_subcommand is not None:
        return
    from modulora_core.registry import list_plugins  # lazy: discovery imports every plugin

    infos = list_plugins()
    if as_json:
        typer.echo(json.dumps([asdict(i) for i in infos], indent=2))
        return
    _print_table(infos)


def _print_table(infos: list) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title="ModuLoRA quantizer plugins")
    for col in ("plugin", "distribution", "version", "families", "presets", "status"):
        table.add_column(col, overflow="fold")
    for i in infos:
        status = "[red]failed[/red]" if i.error else "[green]ok[/green]"
        table.add_row(i.name, i.distribution or "-", i.version or "-", ", ".join(i.families) or "-",
                      ", ".join(i.presets) or "-", status)
    console.print(table)
    for i in infos:
        if i.error:  # in full, after the table: a traceback-sized message would not fit in a cell
            console.print(f"[red]{i.name}[/red]: {i.error}", soft_wrap=True, markup=True, highlight=False)
    if not any(i.families for i in infos):
        console.print("No quantizer plugin is installed: pip install modulora-plugin-rtn (or another plugin).")


@app.command()
def check(
    name: str = typer.Argument(..., help="Preset or family to check, e.g. rtn-4bit."),
    pytest_args: list[str] | None = typer.Argument(  # noqa: B008
        None, help="Extra pytest arguments, after `--` (e.g. -- -x -k materialize)."
    ),
) -> None:
    """Run the conformance kit on an installed preset; exits with pytest's status."""
    from modulora_core.testing import run_conformance  # lazy: imports pytest

    raise typer.Exit(run_conformance(name, list(pytest_args or [])))
