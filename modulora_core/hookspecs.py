"""The hooks a ModuLoRA plugin may implement (pluggy project name ``modulora``)."""

from __future__ import annotations

from typing import Any

import pluggy

hookspec = pluggy.HookspecMarker("modulora")
hookimpl = pluggy.HookimplMarker("modulora")


@hookspec
def modulora_register_quantizers(register: Any) -> None:
    """Call ``register(quantizer, presets={"name-4bit": Config(...)})`` once per quantizer family."""


@hookspec(firstresult=True)
def modulora_detect_format(model_or_path: Any) -> Any:
    """Claim a model or checkpoint path that is already quantized in a format this plugin reads.

    Return a callable ``loader(model_or_path, **load_kwargs) -> model`` (the model with ModuLoRA layers) or
    ``None`` when the format is not yours. The first non-None answer wins.
    """
