"""The memory planner: will this model, quantizer, batch and sequence length fit? Nothing is loaded.

- ``planner``: :func:`plan` adds up one training step's components into a :class:`MemoryPlan`;
- ``shapes``: the model's linears and dense parts, read off its build on the meta device;
- ``activations``: what autograd saves in a Llama block with LoRA;
- ``memtrace``: exact peak bytes of the tensors a piece of code creates (measures and checks the above).
"""

from __future__ import annotations

from .planner import MemoryPlan, format_size, parse_size, plan

__all__ = ["MemoryPlan", "format_size", "parse_size", "plan"]
