"""The registry: names, configs, broken plugins (real distributions on sys.path), MODULORA_PLUGINS, and
the conformance kit's protocol-violation messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from modulora_plugin_rtn import RTNConfig, RTNQuantizer

from modulora_core import (
    PackedWeight,
    QuantizerConfig,
    QuantizerConfigError,
    UnknownQuantizerError,
    hookimpl,
)
from modulora_core.quantizer import validate_config
from modulora_core.registry import (
    Registry,
    available_presets,
    get_preset,
    list_plugins,
    reset_registry,
)
from modulora_core.testing import run_conformance

pytest_plugins = ["pytester"]

MakeDist = Callable[[str, str], Path]


@pytest.fixture
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A registry rediscovered for this test and forgotten after it (so later tests see the real one)."""
    monkeypatch.delenv("MODULORA_PLUGINS", raising=False)
    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def make_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh_registry: None) -> Iterator[MakeDist]:
    """Install a real distribution ``NAME 0.1`` into ``tmp_path`` (on sys.path) whose ``modulora`` entry
    point ``NAME`` is the module ``NAME_mod`` with source ``source``; returns the site directory."""
    monkeypatch.syspath_prepend(str(tmp_path))
    modules: list[str] = []

    def make(name: str, source: str) -> Path:
        info = tmp_path / f"{name}-0.1.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
        (info / "entry_points.txt").write_text(f"[modulora]\n{name} = {name}_mod\n")
        (tmp_path / f"{name}_mod.py").write_text(textwrap.dedent(source))
        modules.append(f"{name}_mod")
        reset_registry()
        return tmp_path

    yield make
    for m in modules:  # the next test must not find a plugin module imported from a deleted directory
        sys.modules.pop(m, None)


BROKEN_IMPORT = 'raise RuntimeError("brokenplug fails to import on purpose")\n'
RAISING_HOOK = """
    from modulora_core import hookimpl

    @hookimpl
    def modulora_register_quantizers(register):
        raise ValueError("register hook fails on purpose")
"""
NOT_A_QUANTIZER = """
    from modulora_core import hookimpl

    @hookimpl
    def modulora_register_quantizers(register):
        register(object(), presets={"fake-4bit": {}})
"""


def plugin(name: str):
    return next(p for p in list_plugins() if p.name == name)


# -- names ----------------------------------------------------------------------------------------------
def test_unknown_name_lists_presets_and_names_the_distribution(fresh_registry, monkeypatch) -> None:
    monkeypatch.setenv("MODULORA_PLUGINS", "rtn")  # so that hqq is unknown even where it is installed
    reset_registry()
    with pytest.raises(UnknownQuantizerError) as e:
        get_preset("hqq-2bit")
    msg = str(e.value)
    assert "unknown quantizer 'hqq-2bit'" in msg
    assert "rtn-4bit" in msg and "modulora-plugin-hqq" in msg
    with pytest.raises(UnknownQuantizerError, match="first-party"):
        get_preset("optq-3bit")


def test_did_you_mean() -> None:
    with pytest.raises(UnknownQuantizerError, match=r"Did you mean 'rtn-4bit'"):
        get_preset("rtn-4bits")
    assert get_preset(" RTN-4bit ").name == "rtn-4bit"  # names are case- and space-insensitive


def test_family_name_gives_its_default_config() -> None:
    bq = get_preset("rtn")
    assert bq.family == "rtn" and bq.config == RTNConfig()


@pytest.mark.parametrize(("data", "field"), [({"bits": 5}, "bits"), ({"group_size": 3}, "group_size"),
                                             ({"bits": 4, "colour": "red"}, "colour")])
def test_invalid_config_values_name_the_field(data, field) -> None:
    with pytest.raises(QuantizerConfigError, match=field) as e:
        RTNConfig.from_json({"family": "rtn", **data})
    assert isinstance(e.value, ValueError) and "RTNConfig" in str(e.value)
    with pytest.raises(QuantizerConfigError, match=field):
        validate_config(RTNConfig, data)


def test_config_of_another_family_is_refused() -> None:
    with pytest.raises(QuantizerConfigError, match="family 'nf4'"):
        RTNConfig.from_json('{"family": "nf4", "bits": 4}')


def test_get_quantizer_with_a_config_object() -> None:
    cfg = RTNConfig(bits=3, group_size=32, symmetric=True)
    bq = get_preset(cfg)
    assert bq.family == "rtn" and bq.config is cfg and bq.plugin == "rtn"
    packed = bq.quantize(torch.randn(16, 64))
    assert isinstance(packed, PackedWeight) and packed.config == cfg and packed.shape == (16, 64)


def test_config_of_an_uninstalled_family_is_unknown() -> None:
    class OtherConfig(QuantizerConfig):
        family = "other"

    with pytest.raises(UnknownQuantizerError, match="OtherConfig"):
        get_preset(OtherConfig())


# -- broken plugins -------------------------------------------------------------------------------------
def test_plugin_that_fails_to_import_is_reported_and_others_load(make_dist) -> None:
    make_dist("brokenplug", BROKEN_IMPORT)
    info = plugin("brokenplug")
    assert info.distribution == "brokenplug" and info.version == "0.1"
    assert "RuntimeError: brokenplug fails to import on purpose" in info.error
    assert info.families == [] and info.presets == []
    assert plugin("rtn").error is None and "rtn-4bit" in available_presets()
    assert get_preset("rtn-4bit").family == "rtn"
    with pytest.raises(UnknownQuantizerError, match="Plugins that failed to load: brokenplug"):
        get_preset("brokenplug-4bit")


def run_cli(*args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MODULORA_PLUGINS"}
    env["COLUMNS"] = "200"  # rich wraps at 80 columns when stdout is not a terminal
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(pythonpath), env.get("PYTHONPATH")]))
    exe = Path(sys.executable).parent / "modulora"
    return subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, timeout=300)


def test_plugin_that_fails_to_import_is_reported_by_the_cli(make_dist) -> None:
    site = make_dist("brokenplug", BROKEN_IMPORT)
    res = run_cli("plugins", "--json", pythonpath=site)
    assert res.returncode == 0, res.stderr
    by_name = {p["name"]: p for p in json.loads(res.stdout)}
    assert "brokenplug fails to import on purpose" in by_name["brokenplug"]["error"]
    assert by_name["rtn"]["error"] is None and "rtn-4bit" in by_name["rtn"]["presets"]
    table = run_cli("plugins", pythonpath=site)
    assert table.returncode == 0 and "brokenplug" in table.stdout and "failed" in table.stdout
    assert "brokenplug fails to import on purpose" in table.stdout


def test_plugin_whose_register_hook_raises_is_reported(make_dist) -> None:
    make_dist("raiseplug", RAISING_HOOK)
    info = plugin("raiseplug")
    assert info.error == "modulora_register_quantizers failed: ValueError: register hook fails on purpose"
    assert "rtn-4bit" in available_presets()


def test_plugin_registering_a_non_quantizer_gets_a_plugin_error(make_dist) -> None:
    make_dist("fakeplug", NOT_A_QUANTIZER)
    err = plugin("fakeplug").error
    assert "PluginError" in err and "plugin 'fakeplug' registered <object object" in err
    assert "which is not a modulora_core.Quantizer" in err
    assert "fake-4bit" not in available_presets()


def test_quantizer_whose_config_family_mismatches_is_refused() -> None:
    class Misnamed(RTNQuantizer):
        name = "misnamed"

    class Plug:
        @hookimpl
        def modulora_register_quantizers(self, register):
            register(Misnamed)

    info = Registry().add_plugin(Plug(), "misnamed-plugin")
    assert "PluginError" in info.error and "RTNConfig.family is 'rtn'" in info.error
    assert "'misnamed'" in info.error


def test_second_plugin_claiming_a_family_is_refused() -> None:
    reg = Registry()

    class First:
        @hookimpl
        def modulora_register_quantizers(self, register):
            register(RTNQuantizer(), presets={"rtn-4bit": RTNConfig()})

    class Second(First):
        pass

    assert reg.add_plugin(First(), "first").error is None
    info = reg.add_plugin(Second(), "second")
    assert "already registered by plugin 'first'" in info.error


def test_modulora_plugins_restricts_loading(make_dist, monkeypatch) -> None:
    make_dist("brokenplug", BROKEN_IMPORT)
    monkeypatch.setenv("MODULORA_PLUGINS", "rtn")
    reset_registry()
    assert {p.name for p in list_plugins()} == {"rtn"}
    assert "rtn-4bit" in available_presets()
    monkeypatch.setenv("MODULORA_PLUGINS", " brokenplug ")
    reset_registry()
    assert {p.name for p in list_plugins()} == {"brokenplug"}
    assert not [n for n in available_presets() if n.startswith("rtn")]
    with pytest.raises(UnknownQuantizerError) as e:
        get_preset("rtn-4bit")
    assert "modulora-plugin-rtn" in str(e.value) and "brokenplug" in str(e.value)


# -- the conformance kit on a plugin that violates the protocol ------------------------------------------
BROKEN_KIT_TEST = """
    from modulora_core.registry import Preset
    from modulora_core.testing import QuantizerConformance
    from modulora_plugin_rtn import RTNConfig, RTNQuantizer


    class WrongShape(RTNQuantizer):
        def materialize(self, packed, *, dtype, device=None, rows=None):
            w = super().materialize(packed, dtype=dtype, device=device, rows=rows)
            return w[:, :-1]  # one column short


    class TestWrongShape(QuantizerConformance):
        preset = Preset("wrong-shape", WrongShape(), RTNConfig(bits=4), "test", None)
"""


def test_kit_failure_names_the_method_and_the_expected_shape(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_wrong_shape=textwrap.dedent(BROKEN_KIT_TEST))
    res = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-k",
                                       "materialize_shape_dtype_device or row_blocks or rejects_nan")
    res.assert_outcomes(failed=2, passed=1)
    out = res.stdout.str()
    assert "'wrong-shape': WrongShape.materialize(" in out
    assert "returned (64, 127); expected shape (64, 128) = [out, in]" in out
    assert out.count("returned (64, 127); expected shape (64, 128)") >= 2  # both failures say so


def test_run_conformance_refuses_an_unknown_name(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_conformance("nope-4bit") == int(pytest.ExitCode.USAGE_ERROR)
    err = capsys.readouterr().err
    assert "unknown quantizer 'nope-4bit'" in err and "rtn-4bit" in err
