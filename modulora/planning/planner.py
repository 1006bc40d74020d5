"""The memory planner: the peak memory of one LoRA training step, before any weight is loaded.

``plan("llama-65b", "rtn-2bit", batch_size=1, seq_len=128, dtype="float16", device="cuda")`` returns a
:class:`MemoryPlan`: a table of components and their total, and whether it fits a budget. What is quantized
(``targets``, ``modules_to_not_convert``, as in ``modulora.load``) and where LoRA goes (``lora``, PEFT's
``LoraConfig``) are chosen apart: the paper's setting is every linear quantized and LoRA on q_proj and
v_proj only. Packed sizes are exact (each plugin's ``packed_nbytes``) for the quantized linears; LoRA
parameters and activations are counted for the adapted ones; the model's linears come from building it on
the meta device; the activations follow :mod:`modulora.planning.activations`; what a plugin's materialize
allocates is measured on a small real weight with :class:`~modulora.planning.memtrace.PeakTracker`.

The step's peak is ``base weights + unquantized parts + LoRA state + saved activations + max(loss
gradients at the start of backward, one layer's backward) + runtime allowance``; only the larger of the
two transients counts.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from peft import LoraConfig

from modulora_core.errors import ModuLoRAError
from modulora_core.quantizer import PackedWeight, QuantizerConfig, dtype_from_name, dtype_name
from modulora_core.registry import Preset, get_preset
from modulora_core.surgery import matches_target

from .activations import StepShape, activations
from .components import Component, GiB, format_size  # noqa: F401 - format_size: part of the public API
from .memtrace import peak_bytes
from .shapes import ModelShapes, _meta_model, model_config, model_shapes
from .sharding import block_packed_bytes, per_process

# Resident memory of the process itself: Python, torch, transformers, modulora, thread pools, allocator
# slack. "cpu" is calibrated on this project's 2-core x86_64 runner (python -m benchmarks.bench_memory
# --calibrate: the peak RSS of a training step of a tiny model, minus its predicted tensors: 420 MiB, the
# same to 0.3 MiB over three runs). "cuda" is a guess, not a measurement, for a CUDA context and cuBLAS
# workspaces (no GPU was available to calibrate it); pass runtime_bytes to use a measured one.
RUNTIME_ALLOWANCE = {"cpu": 420 * (1 << 20), "cuda": 512 * (1 << 20)}
# Plain PEFT LoRA ("dense") on CPU: get_peft_model imports every quantization backend it finds installed
# (GPTQModel, torchao, bitsandbytes here), calibrated the same way: 596 MiB in all.
DENSE_RUNTIME_EXTRA = {"cpu": 176 * (1 << 20), "cuda": 0}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}  # float32 tensors per LoRA param
DENSE = "dense"  # the "quantizer" of plain LoRA on the dense model (PEFT), for comparison
# The "quantizer" of QLoRA as people run it: stock PEFT LoRA on a model that transformers loaded with
# bitsandbytes NF4 (double quantization). Its storage is our nf4 preset's byte for byte, and bitsandbytes'
# 4-bit matmul saves the same input and dequantizes the whole weight in backward as a ModuLoRA layer does;
# what differs is the process: bitsandbytes' native library, 14 MiB on CPU (calibrated as above). PEFT
# finds its bitsandbytes layer first, so it does not import the other backends as for dense LoRA.
QLORA, QLORA_PRESET = "qlora", "nf4"
QLORA_RUNTIME_EXTRA = {"cpu": 14 * (1 << 20), "cuda": 0}
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def parse_size(text: str | int | float) -> int:
    """``"24GB"`` -> 24e9 bytes, ``"24GiB"`` -> 24 * 2**30; a bare number is bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ModuLoRAError(f"a memory size must be positive, got {text!r}")
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS and unit != "":
        raise ModuLoRAError(f"cannot read the memory size {text!r}: write a number and a unit, e.g. '24GB' or "
                            f"'24GiB' (units: B, KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = of 1024)")
    value = float(m.group(1)) * _UNITS[unit or "b"]
    if value <= 0:
        raise ModuLoRAError(f"a memory size must be positive, got {text!r}")
    return int(value)


@dataclass
class MemoryPlan:
    """The predicted peak memory of one training step (forward, backward, optimizer step)."""

    model: str
    quantizer: str
    settings: dict[str, Any]
    components: list[Component]
    budget: int | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """The predicted peak: the sum of the counted components."""
        return sum(c.nbytes for c in self.components if c.counted)

    @property
    def fits(self) -> bool | None:
        """Whether the total is within the budget (None without a budget)."""
        return None if self.budget is None else self.total <= self.budget

    def component(self, key: str) -> Component:
        """The component named ``key`` (``packed``, ``unquantized``, ``lora``, ``activations``, ``loss``,
        ``layer_backward``, ``runtime``)."""
        return next(c for c in self.components if c.key == key)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: every component in bytes, the total, the budget and whether it fits."""
        return {"model": self.model, "quantizer": self.quantizer, "settings": self.settings,
                "components": [asdict(c) for c in self.components], "total_bytes": self.total,
                "total_gib": round(self.total / GiB, 3), "budget_bytes": self.budget, "fits": self.fits,
                "notes": self.notes}

    def rich_table(self) -> Any:
        """A ``rich.table.Table`` of the components, the total and the verdict."""
        from rich.table import Table

        s = self.settings
        title = (f"{self.model} · {self.quantizer} · batch {s['batch_size']} × seq {s['seq_len']} · "
                 f"{'DoRA' if s['use_dora'] else 'LoRA'} r={s['lora_r']} on {', '.join(s['lora_modules'])} · "
                 f"{s['dtype']} · {s['optimizer']}"
                 + (" · gradient checkpointing" if s["gradient_checkpointing"] else "")
                 + (f" · chunk_rows={s['chunk_rows']}" if s["chunk_rows"] else "")
                 + (f" · per process of {s['world_size']} ({'FSDP2' if s['fsdp'] else 'DDP'})"
                    if s.get("world_size", 1) > 1 else ""))
        t = Table(title=title, title_justify="left")
        t.add_column("component")
        t.add_column("size", justify="right")
        t.add_column("detail", overflow="fold")
        for c in self.components:
            size = format_size(c.nbytes) if c.counted else f"[dim]({format_size(c.nbytes)})[/]"
            t.add_row(c.label if c.counted else f"[dim]{c.label}[/]", size,
                      c.detail + ("" if c.counted else " [dim]— not at the peak, not counted[/]"))
        t.add_section()
        t.add_row("[bold]total (peak)[/]", f"[bold]{format_size(self.total)}[/]", f"{self.total / 1e9:.2f} GB")
        if self.budget is not None:
            left = self.budget - self.total
            verdict = (f"[green]fits[/] ({format_size(left)} to spare)" if left >= 0
                       else f"[red]does not fit[/] ({format_size(-left)} over)")
            t.add_row("budget", format_size(self.budget), verdict)
        return t

    def __str__(self) -> str:
        lines = [f"{c.label:<46} {format_size(c.nbytes):>12}{'' if c.counted else '  (not at peak)'}"
                 for c in self.components]
        lines.append(f"{'total (peak)':<46} {format_size(self.total):>12}")
        if self.budget is not None:
            lines.append(f"budget {format_size(self.budget)}: {'fits' if self.fits else 'does NOT fit'}")
        return "\n".join(lines)


QuantizerSpec = str | QuantizerConfig | Preset | Mapping[str, str | QuantizerConfig]


def _resolve(spec: str | QuantizerConfig | Preset) -> Preset | None:
    if isinstance(spec, Preset):
        return spec
    if isinstance(spec, str) and spec.strip().lower() == DENSE:
        return None
    return get_preset(spec)


def _per_module(shapes: ModelShapes, quantizer: QuantizerSpec) -> dict[str, Preset | None]:
    """Target name -> its quantizer (None: dense). A mapping is matched like ``target_modules`` (name or
    ``.``-suffix), in order; the key ``"*"`` catches the rest."""
    if not isinstance(quantizer, Mapping):
        bq = _resolve(quantizer)
        return {t.name: bq for t in shapes.targets}
    resolved = {k: _resolve(v) for k, v in quantizer.items()}
    if None in resolved.values() and any(v is not None for v in resolved.values()):
        raise ModuLoRAError("'dense' cannot be mixed with quantizers in one mapping; to keep a module dense, "
                            "leave it out of targets or name it in modules_to_not_convert")
    out: dict[str, Preset | None] = {}
    for t in shapes.targets:
        key = next((k for k in resolved if k != "*" and matches_target(t.name, [k])), "*")
        if key not in resolved:
            raise ModuLoRAError(f"no quantizer for module {t.name!r}: the mapping's keys {list(resolved)} match "
                                f"neither its name nor a suffix of it; add it or a catch-all key '*'")
        out[t.name] = resolved[key]
    return out


@functools.lru_cache(maxsize=512)
def _packed_nbytes(bq: Preset, out_f: int, in_f: int) -> int:
    return int(bq.quantizer.packed_nbytes((out_f, in_f), bq.config))


@functools.lru_cache(maxsize=256)
def materialize_peak(bq: Preset, out_f: int, in_f: int, rows: int, dtype: torch.dtype) -> int:
    """Peak bytes ``materialize`` allocates (its result included) for ``rows`` rows of an ``(out, in)`` weight.

    Measured on a small real weight (64 rows; for calibrating quantizers with in > 1024, a narrower one)
    and scaled per row and per input: materialize is row-wise, so its allocations grow with rows * in.
    A quantizer whose row blocks are not cheap (``row_chunking=False``) dequantizes the whole weight for
    any block, plus a copy of the block.
    """
    packed = _small_packed(bq, out_f, in_f)
    r0, in0 = packed.shape
    peak, _ = peak_bytes(lambda: bq.quantizer.materialize(packed, dtype=dtype), *packed.tensors.values())
    per_weight = peak / (r0 * in0)
    if bq.capabilities().row_chunking or rows >= out_f:
        return math.ceil(per_weight * rows * in_f)
    return math.ceil(per_weight * out_f * in_f) + rows * in_f * torch.finfo(dtype).bits // 8


@functools.lru_cache(maxsize=256)
def fast_path_peak(bq: Preset, out_f: int, in_f: int, tokens: int, dtype: torch.dtype) -> int:
    """An estimate of what a fast path (``matmul_T``) allocates for ``tokens`` rows of gradient.

    The fast path decodes the weight in blocks of its own choosing: its peak on a small weight (64 rows,
    16 tokens), scaled with in, stands for the decoded block; the rotated copies of the activations and
    of the result are counted in float32 (``2 * tokens * (in + out) * 4``).
    """
    packed = _small_packed(bq, out_f, in_f)
    r0, in0 = packed.shape
    gy = torch.zeros(16, r0, dtype=dtype)
    peak, _ = peak_bytes(lambda: bq.quantizer.matmul_T(gy, packed), gy, *packed.tensors.values())
    return math.ceil(peak * in_f / in0) + 2 * tokens * (in_f + out_f) * 4


def _small_packed(bq: Preset, out_f: int, in_f: int) -> PackedWeight:
    """A real packed weight of 64 rows (or fewer) and ``in_f`` inputs, or about 1024 for quantizers that
    need calibration (their cost grows with in^2; many layer widths then share one small weight)."""
    caps = bq.capabilities()
    r0 = max(caps.out_multiple, -(-min(out_f, 64) // caps.out_multiple) * caps.out_multiple)
    in0 = in_f
    if caps.needs_calibration and in_f > 1024:
        in0 = max(caps.in_multiple, 1024 // caps.in_multiple * caps.in_multiple)
    return _random_packed(bq, r0, in0)


@functools.lru_cache(maxsize=64)
def _random_packed(bq: Preset, rows: int, in_f: int) -> PackedWeight:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(rows, in_f, generator=gen) * in_f**-0.5
    return bq.quantize(w, torch.eye(in_f) if bq.capabilities().needs_calibration else None)


def _lora_targets(lora: LoraConfig | None, config: Any) -> list[str] | str | None:
    """Where PEFT puts adapters for ``lora`` (None: on the quantized linears, ModuLoRA's default):
    ``target_modules``, or PEFT's default for the model type when that is None; plus, for
    ``target_parameters`` naming MoE experts (``"mlp.experts.gate_up_proj"``), every expert's module, as
    ``modulora_core.peft_lora.experts_targets`` maps them for a ModuLoRA model (PEFT's own LoRA on the fused
    parameters has the same number of LoRA weights)."""
    if lora is None:
        return None
    t = lora.target_modules
    params = list(getattr(lora, "target_parameters", None) or [])
    if t is None:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS

        model_type = getattr(config, "model_type", None)
        t = PEFT_DEFAULTS.get(model_type)
        if t is None and not params:
            raise ModuLoRAError(f"the LoraConfig names no target_modules and PEFT has no default for model type "
                                f"{model_type!r}; name them, e.g. target_modules=['q_proj', 'v_proj'] or "
                                f"'all-linear'")
    t = sorted(t) if isinstance(t, (set, list, tuple)) else t
    return _with_expert_parameters(t, params, config) if params else t


def _with_expert_parameters(t: list[str] | str | None, params: list[str], config: Any) -> list[str]:
    """Full names of the linears ``t`` matches plus the per-expert modules of ``target_parameters``."""
    from modulora_core.experts import expert_parameter_modules, is_unfused_experts, projections
    from modulora_core.surgery import select_targets

    model = _meta_model(config)
    names = set(select_targets(model, t)) if t else set()
    experts = [(n, m) for n, m in model.named_modules() if is_unfused_experts(m)]
    for want in params:
        hits = expert_parameter_modules(model, want)
        if not hits:
            known = sorted({f"{n.rsplit('.', 2)[-2]}.{n.rsplit('.', 1)[-1]}.{p}" for n, m in experts
                            for p in projections(m)}) or ["(this model has no MoE experts)"]
            raise ModuLoRAError(f"target_parameters entry {want!r} names no MoE experts matrix; the planner "
                                f"counts target_parameters on experts only, e.g. {known}")
        names.update(hits)
    return sorted(names)


def _leaves(linears: list[Any]) -> list[str]:
    return sorted({t.leaf for t in linears})


def _dtype(x: str | torch.dtype, what: str) -> torch.dtype:
    if isinstance(x, torch.dtype):
        return x
    try:
        return dtype_from_name(str(x).removeprefix("torch."))
    except ModuLoRAError as e:
        raise ModuLoRAError(f"{what}: {e}") from None


def _nbytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def _base_weights(shapes: ModelShapes, per_module: dict[str, Preset | None], chunk_rows: int | None,
                  tokens: int, cdt: torch.dtype, wdt: torch.dtype) -> tuple[int, int, str]:
    """``(bytes of the base weights, peak of the worst linear's backward, which linear)``.

    A linear's backward holds materialize's own peak, or the weight (tile) next to the input gradient it
    produces, whichever is larger. (The LoRA input gradient, already there by then, takes the place of the
    LoRA input that was saved for it and is now freed.) A dense model materializes nothing.
    """
    cb = _nbytes(cdt)
    base, worst, where = 0, 0, ""
    for t in shapes.targets:
        bq = per_module[t.name]
        grad_x = tokens * t.in_features * cb
        if bq is None:
            base += t.out_features * t.in_features * _nbytes(wdt)
            m, w = grad_x, "no materialized weight (dense)"
        elif bq.capabilities().fast_path:  # no dense weight: the plugin's own blocks and rotations
            base += _packed_nbytes(bq, t.out_features, t.in_features)
            m = fast_path_peak(bq, t.out_features, t.in_features, tokens, cdt) + grad_x
            w = f"{t.leaf} {t.out_features}x{t.in_features}, fast path (estimated)"
        else:
            base += _packed_nbytes(bq, t.out_features, t.in_features)
            rows = min(chunk_rows or t.out_features, t.out_features)
            m = max(materialize_peak(bq, t.out_features, t.in_features, rows, cdt),
                    rows * t.in_features * cb + grad_x)
            w = f"{t.leaf} {t.out_features}x{t.in_features}, {rows} rows at a time"
        if m > worst:
            worst, where = m, w
    widest = tokens * max(shapes.hidden_size, shapes.intermediate_size) * cb  # an untargeted dense linear's
    return (base, worst, where) if worst >= widest else (base, widest, "input gradient of a dense linear")


def plan(model: Any, quantizer: QuantizerSpec = "rtn-4bit", *, targets: list[str] | str | None = None,
         modules_to_not_convert: list[str] | None = None, lora: LoraConfig | None = None, batch_size: int = 1,
         seq_len: int = 512, dtype: str | torch.dtype = "float32", weight_dtype: str | torch.dtype | None = None,
         optimizer: str = "adamw", gradient_checkpointing: bool = False, chunk_rows: int | None = None,
         budget: str | int | None = None, device: str = "cpu", runtime_bytes: int | None = None,
         world_size: int = 1, fsdp: bool = False) -> MemoryPlan:
    """Predict the peak memory of one LoRA training step of ``model`` quantized with ``quantizer``.

    ``model``: a built-in shape (``llama-7b`` ... ``llama-65b``, ``llama-2-70b``, ``smollm2-135m``), a
    config.json / model directory, or a config object. ``quantizer``: a preset, a config, ``"dense"``
    (plain LoRA on the dense model), ``"qlora"`` (PEFT LoRA on bitsandbytes NF4, for comparison), or
    ``{module name or suffix: preset, "*": preset}``. ``targets`` / ``modules_to_not_convert``: which
    linears are quantized, as in ``modulora.load`` (default: every linear of the decoder blocks).
    ``lora``: PEFT's ``LoraConfig`` (``r``, ``lora_dropout``, ``use_dora``, ``target_modules``: the adapted
    linears, quantized or not; its None means PEFT's default for the model type, as in ``get_peft_model``);
    ``lora=None``: ModuLoRA's default, r=8 on every quantized linear. ``dtype``: the compute dtype (the
    model's); ``weight_dtype``: that of the unquantized parts (default: ``dtype``). ``device`` picks the
    runtime allowance (``"cpu"`` calibrated, ``"cuda"`` assumed), unless ``runtime_bytes`` is given.
    ``budget``: e.g. ``"24GB"``. ``world_size``: processes (``batch_size`` is each one's); the plan is then
    one process's peak, under DDP or, with ``fsdp``, FSDP2 (:mod:`modulora.planning.sharding`).
    """
    for name, v in (("batch_size", batch_size), ("seq_len", seq_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ModuLoRAError(f"{name} must be a positive int, got {v!r}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ModuLoRAError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ModuLoRAError(f"world_size must be a positive int, got {world_size!r}")
    opt = optimizer.strip().lower()
    if opt not in OPTIMIZER_STATES:
        raise ModuLoRAError(f"unknown optimizer {optimizer!r}; the planner knows {sorted(OPTIMIZER_STATES)}")
    if runtime_bytes is None and device not in RUNTIME_ALLOWANCE:
        raise ModuLoRAError(f"unknown device {device!r}; use one of {sorted(RUNTIME_ALLOWANCE)}, or give the "
                            f"runtime allowance (runtime_bytes=, --runtime)")
    cdt = _dtype(dtype, "dtype")
    wdt = _dtype(weight_dtype, "weight_dtype") if weight_dtype is not None else cdt
    budget_bytes = parse_size(budget) if budget is not None else None
    qlora = isinstance(quantizer, str) and quantizer.strip().lower() == QLORA
    if qlora:
        quantizer = QLORA_PRESET

    config = model_config(model)
    shapes = model_shapes(config, targets, skip=modules_to_not_convert or (),
                          lora_targets=_lora_targets(lora, config))
    lora = lora or LoraConfig(r=8, lora_alpha=16)
    per_module = _per_module(shapes, quantizer)
    cb, wb, lb = (_nbytes(d) for d in (cdt, wdt, torch.float32))
    dense = all(bq is None for bq in per_module.values())

    tokens = batch_size * seq_len
    base, mat, mat_where = _base_weights(shapes, per_module, chunk_rows, tokens, cdt, wdt)
    n_lin = sum(t.out_features * t.in_features for t in shapes.targets)
    names = sorted({bq.name for bq in per_module.values() if bq is not None})
    qname = DENSE if dense else f"{QLORA} (PEFT + bitsandbytes {QLORA_PRESET})" if qlora else ", ".join(names)
    unq = sum(shapes.dense_params.values()) * wb + shapes.buffer_bytes
    n_lora = sum(lora.r * (t.out_features + t.in_features) + (t.out_features if lora.use_dora else 0)
                 for t in shapes.lora_targets)  # A, B (and DoRA's magnitude per output)
    n_states = OPTIMIZER_STATES[opt]
    step = StepShape(tokens=tokens, compute_bytes=cb, lora_bytes=lb, r=lora.r,
                     dropout=lora.lora_dropout, checkpointing=gradient_checkpointing, fused_experts=dense,
                     dropout_mask_bytes=lb if device == "cpu" else 1)
    act = activations(shapes, step)
    loss = act.head_saved + act.head_transient
    layer_bwd = act.layer_grads + mat + act.recomputed_layer
    layers_saved = act.saved - act.head_saved
    runtime = runtime_bytes if runtime_bytes is not None else (
        RUNTIME_ALLOWANCE[device] + (DENSE_RUNTIME_EXTRA[device] if dense else 0)
        + (QLORA_RUNTIME_EXTRA[device] if qlora else 0))
    comps = [
        Component("packed", "dense base weights (frozen)" if dense else "packed base weights",
                  base, f"{len(shapes.targets)} linears, {n_lin / 1e9:.3g}B weights, "
                  f"{8 * base / max(n_lin, 1):.3f} bits/weight" + ("" if dense else f" ({qname})")),
        Component("unquantized", "unquantized parts", unq,
                  f"embeddings, norms, lm_head, other linears: {sum(shapes.dense_params.values()) / 1e6:.1f}M "
                  f"in {dtype_name(wdt)}"),
        # the gradients are counted whole: conservative, since at the step's peak (early in backward) only
        # the last layer's exist; they are all there only at the optimizer step, activations gone
        Component("lora", "LoRA params + grads + optimizer states", n_lora * lb * (2 + n_states),
                  f"{n_lora / 1e6:.2f}M float32 params on {len(shapes.lora_targets)} linears, r={lora.r}"
                  + (", DoRA" if lora.use_dora else "") + f", {opt}: {n_states} states each"),
        Component("activations", "activations saved for backward", layers_saved,
                  f"{shapes.num_layers} layers, {format_size(act.per_layer)} per layer"
                  + (" (checkpointing: layer inputs only)" if gradient_checkpointing else "")),
        Component("loss", "logits + loss gradients", loss,
                  f"vocab {shapes.vocab_size}: log-softmax output + 2 float32 gradients at backward start",
                  counted=loss >= layer_bwd),
        Component("layer_backward", "one layer's backward: weight + grads", layer_bwd,
                  mat_where + (f"; recomputed layer {format_size(act.recomputed_layer)}"
                               if gradient_checkpointing else ""), counted=layer_bwd > loss),
        Component("runtime", "runtime allowance", runtime,
                  f"{device}: " + ("calibrated on this project's CPU runner" if device == "cpu" and
                                   runtime_bytes is None else "assumed" if runtime_bytes is None else "given")),
    ]
    if world_size > 1:
        packed_of = {t.name: (_packed_nbytes(per_module[t.name], t.out_features, t.in_features)
                              if per_module[t.name] is not None else t.out_features * t.in_features * wb)
                     for t in shapes.targets}
        comps = per_process(comps, shapes, world_size=world_size, fsdp=fsdp, device=device,
                            block_packed=block_packed_bytes(shapes, lambda name, o, i: packed_of[name]),
                            dense_bytes_per_param=wb)
    settings = {"world_size": world_size, "fsdp": fsdp and world_size > 1, "batch_size": batch_size, "seq_len": seq_len, "lora_r": lora.r, "lora_dropout": lora.lora_dropout,
                "use_dora": bool(lora.use_dora), "targets": targets,
                "modules_to_not_convert": list(modules_to_not_convert or []),
                "quantized_modules": _leaves(shapes.targets), "lora_modules": _leaves(shapes.lora_targets),
                "n_quantized": len(shapes.targets), "n_lora": len(shapes.lora_targets),
                "dtype": dtype_name(cdt), "weight_dtype": dtype_name(wdt), "optimizer": opt,
                "gradient_checkpointing": gradient_checkpointing, "chunk_rows": chunk_rows, "device": device,
                "n_params": shapes.n_params, "num_experts": shapes.num_experts,
                "experts_per_token": shapes.experts_per_token}
    notes = []
    if shapes.model_type not in ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe"):
        notes.append(f"activations follow a Llama block; {shapes.model_type!r} may differ")
    if shapes.num_experts:
        notes.append(f"MoE: {len(shapes.moe_layers)} layers of {shapes.num_experts} experts (width "
                     f"{shapes.expert_intermediate_size}), top-{shapes.experts_per_token}: activations of the "
                     f"routed (token, expert) pairs only, {shapes.experts_per_token} per token"
                     + ("; shared experts counted as a dense MLP of intermediate_size (approximate)"
                        if shapes.shared_experts else ""))
    if lora.use_dora:
        notes.append("DoRA: its magnitude vectors are counted, not the activations it saves besides LoRA's "
                     "(the base and LoRA outputs of each adapted linear) nor the weight it materializes in "
                     "forward for the column norms")
    if getattr(lora, "exclude_modules", None) or getattr(lora, "layers_to_transform", None):
        notes.append("LoraConfig's exclude_modules / layers_to_transform are not applied: every linear "
                     "target_modules matches is counted")
    return MemoryPlan(shapes.name, qname, settings, comps, budget_bytes, notes)
