"""What one training step of a Llama-style decoder keeps for backward, and its transient peaks.

A model of the tensors autograd saves (found with :class:`modulora.planning.memtrace.PeakTracker` on real
steps, and checked against them in tests). T = batch x sequence tokens, c = compute dtype bytes, l = LoRA
dtype bytes (float32). An op saves tensors only if one of its inputs requires grad, so where the gradient
starts to flow matters: the embeddings are frozen, so the first layer's first norm saves nothing.

Per decoder layer:

- each RMSNorm: its input in float32 (the input itself in float32, a float32 copy otherwise), ``T*h*4``,
  and the reciprocal RMS, ``T*4``;
- attention (SDPA, as transformers runs it): q and k after RoPE, v, the output (which the contiguous o_proj
  input shares) and the log-sum-exp, ``T*(2*qd + 2*kvd)*c + T*heads*4``; GQA runs natively (no copies);
- the MLP: ``silu`` saves the gate output, the product saves silu(gate) and up: ``3*T*f*c``;
- the packed base matmul saves nothing (ModuLoRA re-materializes W), nor does a frozen dense linear;
- each LoRA branch saves the A input and A's output ``T*r*l``. The input is the layer input itself when
  c == l (one tensor for q/k/v, one for gate/up), a float32 copy per linear otherwise (``x.to(A.dtype)``),
  or with dropout the dropped-out copy plus its mask per linear (a bool on CUDA, a float on CPU; none if the
  input carries no gradient).

A mixture-of-experts layer (Mixtral, Qwen3-MoE, ...) runs, in place of the MLP, the router and the routed
experts, unfused one linear per expert matrix (``modulora_core.experts``). With K experts per token the T
tokens make ``T*K`` (token, expert) pairs; per pair, with I' the expert's width:

- the gathered expert input ``h*c`` if gate_up_proj carries LoRA (a float32 copy ``h*l`` when c != l, as
  for any LoRA input);
- the gating: the gate_up output (``2*I'*c``, kept by silu and the product) and silu's output ``I'*c``;
- the down_proj input ``I'*c`` if it carries LoRA (``I'*l`` when c != l);
- A's output ``r*l`` per adapted expert matrix;
- ``y * routing weight`` keeps y ``h*c`` and the float32 weight, and ``index_add_`` keeps that product
  (float32 accumulation: ``h*4`` for 16-bit compute, ``h*c`` otherwise); the pair's indices, two int64.

The router keeps its float32 softmax ``T*E*4`` and its top-k (``T*K`` indices, values and their sum).
Adapters on only some of a layer's experts count for the share of pairs they see. Plain PEFT LoRA on the
fused experts (``target_parameters``, the ``dense`` baseline) instead adds ``A@B`` to the whole fused
parameter each forward (transformers' ``grouped_mm`` experts) and keeps that dense ``[E, out, in]`` copy
for backward, plus per pair the sorted input, the gating, the down input and the output: ``(4*I' + 2*h)*c``. Shared experts (Qwen2-MoE, DeepSeek) are approximated as
a Llama MLP of the config's ``intermediate_size``.

The head: the final norm as above and the log-softmax output ``T*V*4`` (the loss upcasts logits). At the
start of backward the loss gradient and log-softmax's input gradient, ``2*T*V*4``, join it: that is one
candidate for the step's peak. The other is the backward of the last layer: the incoming gradient plus
the widest input gradient, base and LoRA (``T*h*c + T*in*(c + l)``), and the materialized weight (or tile)
with whatever the plugin's materialize allocates besides it. With gradient checkpointing the layers keep
only their inputs (``T*h*c`` each) and the layer being recomputed holds its full saved set during its
backward.
"""

from __future__ import annotations

from dataclasses import dataclass

from .shapes import LINEAR_INPUTS, ModelShapes


@dataclass(frozen=True)
class StepShape:
    """The training step: tokens, dtypes in bytes, LoRA rank and dropout, checkpointing."""

    tokens: int  # batch * sequence length
    compute_bytes: int
    lora_bytes: int
    r: int
    dropout: float
    checkpointing: bool
    dropout_mask_bytes: int = 1  # CUDA saves a bool mask; CPU a float mask of the input's dtype
    fused_experts: bool = False  # MoE experts stay fused, LoRA through PEFT's target_parameters (dense)


def targeted_leaves(shapes: ModelShapes) -> list[set[str]]:
    """Per decoder layer, the leaf names (``q_proj`` ...) that carry a LoRA branch (quantized or not: the
    frozen base saves nothing for backward either way)."""
    layers: list[set[str]] = [set() for _ in range(shapes.num_layers)]
    for t in shapes.lora_targets:
        if t.expert is not None:  # experts' adapters: expert_shares
            continue
        parts = t.name.split(".")
        idx = next((int(p) for p in parts if p.isdigit()), None)
        if idx is not None and idx < shapes.num_layers:
            layers[idx].add(t.leaf)
    return layers


def expert_shares(shapes: ModelShapes) -> list[dict[str, float] | None]:
    """Per decoder layer: None for a dense MLP; for a MoE layer, ``{expert matrix leaf: share of the
    layer's experts whose matrix carries LoRA}``."""
    out: list[dict[str, float] | None] = [None] * shapes.num_layers
    for i in shapes.moe_layers:
        out[i] = {}
    for t in shapes.lora_targets:
        idx = next((int(p) for p in t.name.split(".") if p.isdigit()), None)
        if t.expert is not None and idx is not None and idx < shapes.num_layers and out[idx] is not None:
            out[idx][t.leaf] = out[idx].get(t.leaf, 0.0) + 1 / shapes.num_experts
    return out


def moe_saved_bytes(shapes: ModelShapes, shares: dict[str, float], grad_in: bool, s: StepShape) -> int:
    """Bytes the router and the routed experts of one MoE layer save (the model above)."""
    T, c, lb, h, i_e = s.tokens, s.compute_bytes, s.lora_bytes, shapes.hidden_size, shapes.expert_intermediate_size
    first = "gate_up_proj" if shapes.expert_gated else "up_proj"
    a_first, a_down = shares.get(first, 0.0), shares.get("down_proj", 0.0)
    if not grad_in and not (a_first or a_down):
        return 0
    pairs = T * shapes.experts_per_token
    router = T * shapes.num_experts * 4 + pairs * (8 + 4 + 4) + T * 4 if grad_in else 0
    gating = (3 if shapes.expert_gated else 1) * i_e * c  # gate_up output + silu output (or the act input)
    if s.fused_experts:  # transformers' grouped_mm over the fused stack, A@B folded into it by PEFT:
        # per pair the sorted input, the gating, the down input (the weights require grad), the output;
        # per adapted parameter the dense [E, out, in] stack W + A@B, kept for backward
        per_pair = gating + i_e * c + 2 * h * c + 3 * 8
        dense_copies = (a_first * 2 * i_e * h if shapes.expert_gated else a_first * i_e * h) + a_down * i_e * h
        return router + pairs * per_pair + round(shapes.num_experts * dense_copies * c)
    # y and the routing weight it multiplies; index_add_ keeps their product (its source) in the
    # accumulation dtype (float32 for 16-bit compute); the pair's indices, two int64
    per_pair = gating + h * c + 4 + 2 * 8 + h * max(c, 4)
    lora_in = (lambda d: d * lb) if (c != lb or s.dropout > 0) else (lambda d: d * c)
    adapted = a_first * (lora_in(h) + s.r * lb) + a_down * (lora_in(i_e) + s.r * lb)
    if s.dropout > 0:
        adapted += (a_first * h + a_down * i_e) * (s.dropout_mask_bytes if grad_in else 0)
    return router + round(pairs * (per_pair + adapted))


def layer_saved_bytes(shapes: ModelShapes, leaves: set[str], grad_in: bool, s: StepShape,
                      experts: dict[str, float] | None = None) -> tuple[int, bool]:
    """``(bytes one decoder layer saves for backward, whether its output requires grad)``; ``experts``:
    this layer's :func:`expert_shares` when its MLP is a MoE block."""
    T, c, lb = s.tokens, s.compute_bytes, s.lora_bytes
    h, f = shapes.hidden_size, shapes.intermediate_size
    qd, kvd = shapes.num_heads * shapes.head_dim, shapes.num_kv_heads * shapes.head_dim
    width = {"norm1": h, "attn": qd, "norm2": h, "mlp": f}
    total = 0

    def norm(grad: bool) -> int:
        return T * h * 4 + T * 4 if grad else 0

    def lora(role: str, already_saved: bool, input_grad: bool) -> int:
        mine = [leaf for leaf in leaves if LINEAR_INPUTS.get(leaf) == role]
        n, d = len(mine), width[role]
        if not n:
            return 0
        out = n * T * s.r * lb  # A's output, saved by B
        if s.dropout > 0:  # per linear: the dropped-out copy, and its mask if the input carries a gradient
            out += n * T * d * (lb + (s.dropout_mask_bytes if input_grad else 0))
        elif c != lb:
            out += n * T * d * lb  # x.to(float32), per linear
        elif not already_saved:
            out += T * d * c  # the shared input itself, once
        return out

    total += norm(grad_in)
    total += lora("norm1", False, grad_in)
    q_g, k_g, v_g = (grad_in or p in leaves for p in ("q_proj", "k_proj", "v_proj"))
    attn_g = q_g or k_g or v_g
    if attn_g:  # SDPA saves q, k, v, output and log-sum-exp
        total += T * (2 * qd + 2 * kvd) * c + T * shapes.num_heads * 4
    total += lora("attn", attn_g, attn_g)
    h1_g = attn_g or "o_proj" in leaves
    total += norm(h1_g)
    total += lora("norm2", False, h1_g)
    gate_g, up_g = h1_g or "gate_proj" in leaves, h1_g or "up_proj" in leaves
    if experts is not None:
        total += moe_saved_bytes(shapes, experts, h1_g, s)
        if not shapes.shared_experts:  # no dense MLP beside the routed experts
            gate_g = up_g = False
        total += T * f * c * (2 * gate_g + up_g)
        total += sum(T * (h + s.r) * lb for leaf in leaves if leaf not in LINEAR_INPUTS)
        total += lora("mlp", False, gate_g or up_g)
        return total, h1_g or gate_g or up_g or bool(experts) or "down_proj" in leaves
    # silu saves the gate output; silu(gate) * up saves up for silu's gradient and silu(gate) for up's
    total += T * f * c * (2 * gate_g + up_g)
    # a linear that is not a Llama block's (another architecture): as if it saved a float32 hidden-size input
    total += sum(T * (h + s.r) * lb for leaf in leaves if leaf not in LINEAR_INPUTS)
    total += lora("mlp", False, gate_g or up_g)
    out_g = h1_g or gate_g or up_g or "down_proj" in leaves
    return total, out_g


@dataclass
class Activations:
    """Bytes of the step's activations: what stays saved, and the two transient peaks on top of it."""

    saved: int  # all layers + head, at the start of backward
    per_layer: int  # one full (non-first) layer's saved set
    head_saved: int
    head_transient: int  # loss gradients at the start of backward
    layer_grads: int  # the incoming gradient of one layer's backward (its linears' buffers come on top)
    recomputed_layer: int  # with checkpointing: the layer being recomputed; else 0


def activations(shapes: ModelShapes, s: StepShape) -> Activations:
    """The activation model above for ``shapes`` and the step ``s``."""
    T, c = s.tokens, s.compute_bytes
    per_layer_leaves = targeted_leaves(shapes)
    moe = expert_shares(shapes)
    grad = False
    saved_layers, full = 0, 0
    for leaves, experts in zip(per_layer_leaves, moe, strict=True):
        b, grad_out = layer_saved_bytes(shapes, leaves, grad, s, experts)
        if grad:  # a layer whose input carries a gradient: the typical one
            full = max(full, b)
        saved_layers += b
        grad = grad_out
    if not full and per_layer_leaves:
        full = max(layer_saved_bytes(shapes, leaves, True, s, e)[0] for leaves, e in zip(per_layer_leaves, moe,
                                                                                          strict=True))
    head_saved = (T * shapes.hidden_size * 4 + T * 4 if grad else 0) + T * shapes.vocab_size * 4
    head_transient = 2 * T * shapes.vocab_size * 4
    layer_grads = T * shapes.hidden_size * c
    if s.checkpointing:  # each layer keeps its input hidden states for the recomputation
        return Activations(saved=shapes.num_layers * T * shapes.hidden_size * c + head_saved, per_layer=full,
                           head_saved=head_saved, head_transient=head_transient, layer_grads=layer_grads,
                           recomputed_layer=full)
    return Activations(saved=saved_layers + head_saved, per_layer=full, head_saved=head_saved,
                       head_transient=head_transient, layer_grads=layer_grads, recomputed_layer=0)
