"""Exceptions of ModuLoRA. Each message says what was wrong and what would be right."""

from __future__ import annotations


class ModuLoRAError(Exception):
    """Base class of every error ModuLoRA raises on purpose."""


class UnknownQuantizerError(ModuLoRAError, KeyError):
    """A quantizer name or config that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class QuantizerConfigError(ModuLoRAError, ValueError):
    """A quantizer config value that the plugin does not support."""


class InvalidWeightError(ModuLoRAError, ValueError):
    """A weight (or Hessian) with the wrong shape, dtype, or non-finite values."""


class PluginError(ModuLoRAError):
    """A plugin that failed to import, to register, or that violates the protocol."""


class TargetModulesError(ModuLoRAError, ValueError):
    """The model has no module matching the requested targets."""


class CheckpointError(ModuLoRAError):
    """A checkpoint that is missing, corrupted, or from another quantizer/plugin/format version."""


class AdapterError(ModuLoRAError):
    """An adapter that does not fit the model it is loaded onto."""


class CalibrationError(ModuLoRAError, ValueError):
    """Calibration data that is missing or unusable."""


class DataError(ModuLoRAError, ValueError):
    """Training or evaluation data that is missing, empty, malformed, or an unknown task."""


def sharded_error(what: str) -> ModuLoRAError:
    """The error for using ``what`` (a model, a layer's packed weight) while FSDP2 holds it sharded."""
    return ModuLoRAError(
        f"{what} is sharded by FSDP2 (modulora_core.fsdp.shard_model): this process holds only a part of each "
        f"packed weight, so it cannot be dequantized, merged or exported here. Save the adapter gathered "
        f"(full_trainable_state_dict, or modulora finetune --fsdp's OUT/adapter), then merge or export in one "
        f"process from the saved base: modulora merge --model BASE --adapter ADAPTER")
