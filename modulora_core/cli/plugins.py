"""`modulora plugins`: list installed quantizer plugins; `modulora plugins check NAME`: conformance kit."""

from __future__ import annotations

import typer

app = typer.Typer(help="List quantizer plugins and check them with the conformance kit.", invoke_without_command=True)
