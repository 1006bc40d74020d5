"""Model shapes for the memory planner: built-in Llama configurations, or any HF config, built on meta.

The model is built on the meta device (no weight is allocated) and the planner reads from it exactly what
``modulora.load`` would quantize (``select_targets``, the same function), everything else it would keep
dense (embeddings, norms, lm_head, untargeted linears), counting tied tensors once, and, apart, the linears
that carry LoRA adapters (by default the quantized ones; any linear can, quantized or not).

Mixture-of-experts layers are unfused on the meta model as ``modulora.load`` unfuses them
(:func:`modulora_core.experts.unfuse_experts`): each expert's matrix is one more linear
(``mlp.experts.<e>.gate_up_proj``), so its storage is counted like any other; the routers stay dense.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from modulora_core.errors import ModuLoRAError
from modulora_core.experts import is_unfused_experts, projections
from modulora_core.layouts import out_in

if TYPE_CHECKING:
    from transformers import PretrainedConfig

Targets = list[str] | str | None  # PEFT's meaning: names or suffixes, a regex, "all-linear"

# LlamaConfig kwargs. LLaMA-1 from Touvron et al. 2023 (Table 2) and the converted HF checkpoints; "30b" is
# the 32.5B model the paper calls 30B. Llama-2-70B uses grouped-query attention (8 KV heads).
_LLAMA1 = {"vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False}
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "llama-7b": {**_LLAMA1, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                 "num_attention_heads": 32, "num_key_value_heads": 32},
    "llama-13b": {**_LLAMA1, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
                  "num_attention_heads": 40, "num_key_value_heads": 40},
    "llama-30b": {**_LLAMA1, "hidden_size": 6656, "intermediate_size": 17920, "num_hidden_layers": 60,
                  "num_attention_heads": 52, "num_key_value_heads": 52},
    "llama-65b": {**_LLAMA1, "hidden_size": 8192, "intermediate_size": 22016, "num_hidden_layers": 80,
                  "num_attention_heads": 64, "num_key_value_heads": 64},
    "llama-2-70b": {"vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                    "tie_word_embeddings": False, "hidden_size": 8192, "intermediate_size": 28672,
                    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8},
    "smollm2-135m": {"vocab_size": 49152, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True, "hidden_size": 576, "intermediate_size": 1536,
                     "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
                     "head_dim": 64, "rope_theta": 100000.0},
}

# Linear leaf names of a Llama-style block, by the tensor they read: the activation model needs to know
# which linears share an input (q/k/v read the first norm's output, gate/up the second's).
LINEAR_INPUTS = {"q_proj": "norm1", "k_proj": "norm1", "v_proj": "norm1", "o_proj": "attn",
                 "gate_proj": "norm2", "up_proj": "norm2", "down_proj": "mlp"}


@dataclass(frozen=True)
class LinearShape:
    """One linear layer (quantized, or adapted, or both): ``[out, in]`` weight, optional bias."""

    name: str
    out_features: int
    in_features: int
    bias: bool
    expert: int | None = None  # the expert's index when this is one expert's matrix of a MoE layer

    @property
    def leaf(self) -> str:
        return self.name.rsplit(".", 1)[-1]


@dataclass
class ModelShapes:
    """What the planner needs to know about a model, read off its meta-device build."""

    name: str
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    targets: list[LinearShape]  # the quantized linears
    dense_params: dict[str, int] = field(default_factory=dict)  # name -> numel, kept unquantized, tied once
    buffer_bytes: int = 0  # real buffers (RoPE frequencies): not scaled by the weight dtype
    lora_targets: list[LinearShape] = field(default_factory=list)  # the linears with a LoRA adapter
    num_experts: int = 0  # routed experts per MoE layer (0: a dense model)
    experts_per_token: int = 0  # top-k: the experts each token is routed to
    expert_intermediate_size: int = 0  # I' of one expert (gate_up_proj is [2I', h] or up_proj [I', h])
    moe_layers: tuple[int, ...] = ()  # the decoder layers whose MLP is a routed-experts block
    expert_gated: bool = True  # gate_up_proj (silu(gate) * up), or a single up_proj
    shared_experts: bool = False  # a dense MLP beside the routed experts (Qwen2-MoE, DeepSeek)

    @property
    def n_params(self) -> int:
        """Every parameter of the dense model (tied ones once)."""
        return sum(t.out_features * t.in_features for t in self.targets) + sum(self.dense_params.values())


def model_config(model: str | os.PathLike | PretrainedConfig) -> PretrainedConfig:
    """A built-in name (``llama-7b`` ...), a config.json file or model directory, a Hub id already in the
    local HF cache, or a config object; a clear error naming the built-ins otherwise."""
    from transformers import AutoConfig, LlamaConfig, PretrainedConfig

    if isinstance(model, PretrainedConfig):
        return model
    key = str(model).strip()
    if key.lower() in BUILTIN_MODELS:
        cfg = LlamaConfig(**BUILTIN_MODELS[key.lower()], architectures=["LlamaForCausalLM"])
        cfg.name_or_path = key.lower()
        return cfg
    path = Path(key).expanduser()
    if path.is_file() or path.is_dir():
        try:
            cfg = AutoConfig.from_pretrained(str(path.parent if path.is_file() else path))
        except (OSError, ValueError, KeyError) as e:
            raise ModuLoRAError(f"cannot read a Hugging Face config from {path}: {e}") from e
        cfg.name_or_path = str(path)
        return cfg
    if "/" in key and not key.startswith((".", "/")):  # an "org/name" id: only what is cached locally
        try:
            return AutoConfig.from_pretrained(key, local_files_only=True)
        except (OSError, ValueError) as e:
            raise ModuLoRAError(
                f"model {key!r} is not in the local Hugging Face cache ({type(e).__name__}); the planner does "
                f"not download: pass its config.json or directory, or a built-in shape: "
                f"{', '.join(BUILTIN_MODELS)}") from e
    raise ModuLoRAError(f"unknown model {key!r}: not a built-in shape ({', '.join(BUILTIN_MODELS)}), and no "
                        f"file or directory of that name; pass a config.json, a model directory or a Hub id")


def _get(cfg: PretrainedConfig, *names: str) -> Any:
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return None


def _meta_model(config: PretrainedConfig) -> nn.Module:
    """The model of ``config`` on the meta device, tied as ``from_pretrained`` ties it; the last few are
    kept (a 65B build takes a second, and a plan may read the same model twice)."""
    key = (type(config).__name__, config.to_json_string(use_diff=False))
    if key not in _META_MODELS:
        from modulora_core.surgery import build_empty

        try:
            model = build_empty(config)
        except Exception as e:  # noqa: BLE001 - any construction failure is the config's, say which
            raise ModuLoRAError(f"cannot build a {getattr(config, 'model_type', '?')} model from this config on "
                                f"the meta device: {type(e).__name__}: {e}") from e
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        if getattr(text, "tie_word_embeddings", False):
            model.tie_weights()  # build_empty leaves tying to from_pretrained
        from modulora_core.experts import unfuse_experts

        unfuse_experts(model)  # as modulora.load does: one linear per expert matrix
        while len(_META_MODELS) >= 4:
            _META_MODELS.pop(next(iter(_META_MODELS)))
        _META_MODELS[key] = model
    return _META_MODELS[key]


_META_MODELS: dict[tuple[str, str], nn.Module] = {}
_FOUR_H = frozenset({"gpt2", "gpt_bigcode", "gptj", "bloom", "falcon", "codegen"})


def model_shapes(config: PretrainedConfig, targets: Targets = None, *, skip: Iterable[str] = (),
                 lora_targets: Targets = None) -> ModelShapes:
    """Enumerate the model's linears exactly on the meta device. ``targets`` / ``skip``: what is quantized,
    as in ``modulora.load`` (None: every linear of the decoder blocks); ``lora_targets``: where LoRA goes,
    as PEFT's ``target_modules`` (names or suffixes, a regex, ``"all-linear"``; None: exactly the quantized
    linears)."""
    from modulora_core.surgery import select_targets

    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    dims = {k: _get(text, *names) for k, names in {
        "hidden": ("hidden_size", "n_embd", "d_model"), "inter": ("intermediate_size", "ffn_dim", "n_inner"),
        "layers": ("num_hidden_layers", "n_layer"), "heads": ("num_attention_heads", "n_head"),
        "vocab": ("vocab_size",)}.items()}
    if dims["inter"] is None and dims["hidden"] is not None and getattr(text, "model_type", "") in _FOUR_H:
        dims["inter"] = 4 * dims["hidden"]  # n_inner=None: these models' MLPs are 4 * hidden wide
    if missing := [k for k, v in dims.items() if v is None]:
        raise ModuLoRAError(f"config of model_type {getattr(config, 'model_type', '?')!r} lacks {missing}; the "
                            f"planner needs a decoder-only LM config with hidden size, intermediate size, "
                            f"layers, heads and vocabulary")
    kv = _get(text, "num_key_value_heads") or dims["heads"]
    head_dim = _get(text, "head_dim") or dims["hidden"] // dims["heads"]
    model = _meta_model(config)
    names = select_targets(model, targets, skip)
    lora_names = names if lora_targets is None else select_targets(model, lora_targets)

    experts = {n: m for n, m in model.named_modules() if is_unfused_experts(m)}
    expert_of = {f"{n}.{e}.{p}": e for n, m in experts.items() for p in projections(m)
                 for e in range(m._modulora_num_experts)}

    def shape(n: str) -> LinearShape:
        m = model.get_submodule(n)
        out_f, in_f = out_in(m)  # GPT-2's Conv1D stores [in, out]
        return LinearShape(n, out_f, in_f, getattr(m, "bias", None) is not None, expert_of.get(n))

    packed_weights = {f"{n}.weight" for n in names}
    dense: dict[str, int] = {}
    seen: set[int] = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        # a quantized weight is replaced; a tensor tied to it stays dense (load unties them)
        if n in packed_weights or id(p) in seen:
            continue
        seen.add(id(p))
        dense[n] = p.numel()
    buffers = sum(b.numel() * b.element_size() for b in model.buffers() if not b.is_meta)
    moe = _moe_fields(model, experts, text, int(dims["layers"]))
    return ModelShapes(
        name=str(getattr(config, "name_or_path", "") or getattr(config, "model_type", "model")),
        model_type=str(getattr(config, "model_type", "")), hidden_size=int(dims["hidden"]),
        intermediate_size=int(dims["inter"]), num_layers=int(dims["layers"]), num_heads=int(dims["heads"]),
        num_kv_heads=int(kv), head_dim=int(head_dim), vocab_size=int(dims["vocab"]),
        targets=[shape(n) for n in names], dense_params=dense, buffer_bytes=int(buffers),
        lora_targets=[shape(n) for n in lora_names], **moe)


def _moe_fields(model: nn.Module, experts: dict[str, nn.Module], text: PretrainedConfig,
                num_layers: int) -> dict[str, Any]:
    """ModelShapes' MoE fields, read from the unfused experts modules (the expert's width from its down
    projection's input) and top-k from the config."""
    if not experts:
        return {}
    name, m = next(iter(experts.items()))
    first, down = projections(m)
    inter = out_in(getattr(m._modules["0"], down))[1]
    layers = sorted({int(p) for n in experts for p in n.split(".") if p.isdigit() and int(p) < num_layers})
    top_k = _get(text, "num_experts_per_tok", "experts_per_token", "moe_topk", "top_k") or 1
    return {"num_experts": int(m._modulora_num_experts), "experts_per_token": int(top_k),
            "expert_intermediate_size": int(inter), "moe_layers": tuple(layers),
            "expert_gated": first == "gate_up_proj",
            "shared_experts": any("shared_expert" in n for n, _ in model.named_modules())}


def quantized_names(model: str | os.PathLike | PretrainedConfig, targets: Targets = None,
                    skip: Iterable[str] = ()) -> list[str]:
    """The full names of the linears ``modulora.load`` would quantize (as ``target_modules`` they put LoRA
    on exactly those)."""
    return [t.name for t in model_shapes(model_config(model), targets, skip=skip).targets]
