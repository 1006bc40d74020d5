"""Plugin discovery (entry-point group ``modulora``), quantizer families and preset names.

Each plugin is loaded and asked to register on its own, so one broken plugin is reported (``modulora
plugins``) and the others still work. ``MODULORA_PLUGINS=a,b`` restricts loading to those entry points.
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError, QuantizerConfigError, UnknownQuantizerError
from .quantizer import PackedWeight, Quantizer, QuantizerConfig, validate_config

ENTRY_POINT_GROUP = "modulora"

# Which distribution provides a family we know of, for the "unknown quantizer" message.
KNOWN_PROVIDERS = {
    "rtn": "modulora-plugin-rtn (pip install modulora-plugin-rtn, or plugins/modulora-plugin-rtn)",
    "hqq": "modulora-plugin-hqq (pip install modulora-plugin-hqq, or plugins/modulora-plugin-hqq)",
    "nf4": "modulora (first-party: reinstall modulora)",
    "fp4": "modulora (first-party: reinstall modulora)",
    "optq": "modulora (first-party: reinstall modulora)",
    "gptq": "modulora (first-party: reinstall modulora)",
    "quip#": "modulora (first-party: reinstall modulora)",
    "quipsharp": "modulora (first-party: reinstall modulora)",
}


@dataclass(frozen=True)
class Family:
    """A registered quantizer family and where it came from."""

    quantizer: Quantizer
    plugin: str
    distribution: str | None
    version: str | None


@dataclass(frozen=True)
class Preset:
    """A quantizer with its config: what ``modulora.get_preset`` returns."""

    name: str
    quantizer: Quantizer
    config: QuantizerConfig
    plugin: str
    version: str | None

    @property
    def family(self) -> str:
        return self.quantizer.name

    def quantize(self, weight: Any, hessian: Any = None) -> PackedWeight:
        """Validate and quantize one ``[out, in]`` weight into packed storage."""
        return self.quantizer.quantize_weight(weight, self.config, hessian)

    def capabilities(self) -> Any:
        return self.quantizer.capabilities(self.config)


@dataclass
class PluginInfo:
    """One plugin as ``modulora plugins`` reports it."""

    name: str
    distribution: str | None = None
    version: str | None = None
    families: list[str] = field(default_factory=list)
    presets: list[str] = field(default_factory=list)
    error: str | None = None


class Registry:
    """Quantizer families and presets gathered from every plugin."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager("modulora")
        self.pm.add_hookspecs(hookspecs)
        self.families: dict[str, Family] = {}
        self.presets: dict[str, tuple[str, QuantizerConfig]] = {}
        self.plugins: dict[str, PluginInfo] = {}

    # -- loading -------------------------------------------------------------------------------------
    def load_entry_points(self) -> None:
        allowed = os.environ.get("MODULORA_PLUGINS")
        only = {s.strip() for s in allowed.split(",") if s.strip()} if allowed else None
        for ep in sorted(md.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            if only is not None and ep.name not in only:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, dist.metadata["Name"] if dist else None, dist.version if dist else None)
            self.plugins[ep.name] = info
            try:
                obj = ep.load()
            except Exception as e:  # noqa: BLE001 - any import failure is reported, never fatal
                info.error = f"import of {ep.value!r} failed: {type(e).__name__}: {e}"
                continue
            self.add_plugin(obj, ep.name, info)

    def add_plugin(self, obj: Any, name: str, info: PluginInfo | None = None) -> PluginInfo:
        """Register a plugin object (module or instance with hook implementations) and run its hooks."""
        info = info or self.plugins.get(name) or PluginInfo(name)
        self.plugins[name] = info
        try:
            self.pm.register(obj, name=name)
        except Exception as e:  # noqa: BLE001
            info.error = f"registration failed: {type(e).__name__}: {e}"
            return info
        for impl in self.pm.hook.modulora_register_quantizers.get_hookimpls():
            if impl.plugin_name != name:
                continue
            try:
                impl.function(register=self._register_callback(info))
            except Exception as e:  # noqa: BLE001
                info.error = f"modulora_register_quantizers failed: {type(e).__name__}: {e}"
        return info

    def _register_callback(self, info: PluginInfo):
        def register(quantizer: Quantizer | type[Quantizer],
                     presets: Mapping[str, QuantizerConfig | Mapping[str, Any]] | None = None) -> None:
            q = quantizer() if isinstance(quantizer, type) else quantizer
            _check_protocol(q, info.name)
            fam = q.name.lower()
            if fam in self.families and self.families[fam].plugin != info.name:
                raise PluginError(
                    f"quantizer family {fam!r} is already registered by plugin {self.families[fam].plugin!r}"
                )
            self.families[fam] = Family(q, info.name, info.distribution, info.version)
            info.families.append(fam)
            for alias, cfg in (presets or {}).items():
                if not isinstance(cfg, QuantizerConfig):
                    cfg = validate_config(q.config_class, dict(cfg))
                if not isinstance(cfg, q.config_class):
                    raise PluginError(f"preset {alias!r}: config must be a {q.config_class.__name__}")
                key = alias.lower()
                if key in self.presets and self.presets[key][0] != fam:
                    raise PluginError(f"preset {alias!r} is already registered for family {self.presets[key][0]!r}")
                self.presets[key] = (fam, cfg)
                info.presets.append(key)

        return register

    # -- lookup --------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(set(self.presets) | set(self.families))

    def resolve(self, name_or_config: str | QuantizerConfig) -> Preset:
        if isinstance(name_or_config, QuantizerConfig):
            cfg = name_or_config
            for fam, entry in self.families.items():
                if isinstance(cfg, entry.quantizer.config_class):
                    return Preset(fam, entry.quantizer, cfg, entry.plugin, entry.version)
            raise UnknownQuantizerError(
                f"no installed plugin takes a {type(cfg).__name__} (family {cfg.family!r}). "
                + self._install_hint(cfg.family)
            )
        if not isinstance(name_or_config, str):
            raise UnknownQuantizerError(
                f"quantizer must be a preset name or a QuantizerConfig, got {type(name_or_config).__name__}"
            )
        key = name_or_config.strip().lower()
        if key in self.presets:
            fam, cfg = self.presets[key]
            entry = self.families[fam]
            return Preset(key, entry.quantizer, cfg, entry.plugin, entry.version)
        if key in self.families:
            entry = self.families[key]
            try:
                cfg = entry.quantizer.config_class()
            except Exception as e:  # noqa: BLE001 - a family without defaults needs a preset
                raise QuantizerConfigError(
                    f"quantizer family {key!r} has no default config; use one of its presets: "
                    f"{sorted(p for p, (f, _) in self.presets.items() if f == key)}"
                ) from e
            return Preset(key, entry.quantizer, cfg, entry.plugin, entry.version)
        close = difflib.get_close_matches(key, self.names(), n=3)
        msg = f"unknown quantizer {name_or_config!r}."
        if close:
            msg += f" Did you mean {', '.join(repr(c) for c in close)}?"
        msg += f" Installed presets: {', '.join(self.names()) or '(none)'}. " + self._install_hint(key)
        raise UnknownQuantizerError(msg)

    def _install_hint(self, name: str) -> str:
        fam = name.split("-")[0]
        broken = [f"{p.name}: {p.error}" for p in self.plugins.values() if p.error]
        hint = ""
        if fam in KNOWN_PROVIDERS:
            hint = f"The {fam!r} quantizers come from {KNOWN_PROVIDERS[fam]}."
        else:
            hint = "Install the plugin distribution that provides it (see `modulora plugins`)."
        if broken:
            hint += " Plugins that failed to load: " + "; ".join(broken)
        return hint

    def detect_format(self, model_or_path: Any) -> Any:
        return self.pm.hook.modulora_detect_format(model_or_path=model_or_path)


def _check_protocol(q: Any, plugin: str) -> None:
    if not isinstance(q, Quantizer):
        raise PluginError(f"plugin {plugin!r} registered {q!r}, which is not a modulora_core.Quantizer")
    if not getattr(q, "name", None):
        raise PluginError(f"plugin {plugin!r}: quantizer {type(q).__name__} has no `name`")
    cc = getattr(q, "config_class", None)
    if not (isinstance(cc, type) and issubclass(cc, QuantizerConfig)):
        raise PluginError(f"plugin {plugin!r}: {type(q).__name__}.config_class must subclass QuantizerConfig")
    if cc.family != q.name:
        raise PluginError(
            f"plugin {plugin!r}: {cc.__name__}.family is {cc.family!r} but the quantizer's name is {q.name!r}"
        )


_LOCK = threading.Lock()
_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use from the installed entry points."""
    global _REGISTRY
    with _LOCK:
        if _REGISTRY is None:
            reg = Registry()  # the core's own formats are read by modulora_core.checkpoint, not a plugin
            reg.load_entry_points()
            _REGISTRY = reg
        return _REGISTRY


def reset_registry() -> None:
    """Forget discovered plugins (the next call rediscovers; used after installing plugins and in tests)."""
    global _REGISTRY
    with _LOCK:
        _REGISTRY = None


def available_presets() -> list[str]:
    """Every preset and family name that ``get_preset`` accepts, sorted."""
    return get_registry().names()


def get_preset(name_or_config: str | QuantizerConfig) -> Preset:
    """Resolve ``"rtn-4bit"`` (a preset), ``"rtn"`` (a family with its default config) or a config object."""
    return get_registry().resolve(name_or_config)


def get_family(name: str) -> Family:
    """The registered family ``name`` (e.g. from checkpoint metadata); a clear error when absent."""
    reg = get_registry()
    try:
        return reg.families[name.lower()]
    except KeyError:
        raise UnknownQuantizerError(
            f"no installed plugin provides quantizer family {name!r}. Installed families: "
            f"{', '.join(sorted(reg.families)) or '(none)'}. " + reg._install_hint(name)
        ) from None


def list_plugins() -> list[PluginInfo]:
    """Every discovered plugin with its version, families, presets and load error (if any)."""
    return sorted(get_registry().plugins.values(), key=lambda p: p.name)
