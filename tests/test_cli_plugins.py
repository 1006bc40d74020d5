"""`modulora plugins` through the installed console script, and the core's independence from plugins."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import modulora_core

MODULORA = Path(sys.executable).parent / "modulora"  # the console script of this environment


def run(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODULORA_PLUGINS"}
    env["COLUMNS"] = "200"  # rich wraps at 80 columns when stdout is not a terminal
    return subprocess.run([str(MODULORA), *args], capture_output=True, text=True, env=env, timeout=300)


def test_plugins_lists_a_table() -> None:
    res = run("plugins")
    assert res.returncode == 0, res.stderr
    for text in ("rtn", "modulora-plugin-rtn", "rtn-4bit", "rtn-2bit", "ok"):
        assert text in res.stdout


def test_plugins_json() -> None:
    res = run("plugins", "--json")
    assert res.returncode == 0, res.stderr
    by_name = {p["name"]: p for p in json.loads(res.stdout)}
    rtn = by_name["rtn"]
    assert rtn["distribution"] == "modulora-plugin-rtn" and rtn["version"]
    assert rtn["families"] == ["rtn"] and rtn["error"] is None
    assert {"rtn-2bit", "rtn-3bit", "rtn-4bit", "rtn-8bit"} <= set(rtn["presets"])
    assert set(rtn) == {"name", "distribution", "version", "families", "presets", "error"}


def test_plugins_check_passes_on_rtn_4bit() -> None:
    res = run("plugins", "check", "rtn-4bit")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "'rtn-4bit' (family 'rtn', plugin 'rtn'" in res.stdout
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_plugins_check_passes_extra_pytest_args() -> None:
    res = run("plugins", "check", "rtn-4bit", "--", "-q", "-k", "test_rejects_nan")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout and "deselected" in res.stdout


def test_plugins_check_unknown_name_fails_clearly() -> None:
    res = run("plugins", "check", "nope")
    assert res.returncode != 0
    assert "unknown quantizer 'nope'" in res.stderr and "rtn-4bit" in res.stderr
    assert "Traceback" not in res.stderr


def test_core_never_imports_a_plugin_package() -> None:
    root = Path(modulora_core.__file__).parent
    offenders = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                    "import_module", "__import__"):  # importlib.import_module("modulora_plugin_x")
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            else:
                continue
            offenders += [f"{path.relative_to(root)}:{node.lineno} {n}" for n in names
                          if n.split(".")[0].startswith("modulora_plugin")]
    assert len(list(root.rglob("*.py"))) > 10
    assert not offenders, f"modulora_core imports plugin packages: {offenders}"
