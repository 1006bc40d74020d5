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


def targeted_leaves(shapes: ModelShapes) -> list[set[str]]:
    """Per decoder layer, the leaf names (``q_proj`` ...) that carry a LoRA branch (quantized or not: the
    frozen base saves nothing for backward either way)."""
    layers: list[set[str]] = [set() for _ in range(shapes.num_layers)]
    for t in shapes.lora_targets:
        parts = t.name.split(".")
        idx = next((int(p) for p in parts if p.isdigit()), None)
        if idx is not None and idx < shapes.num_layers:
            layers[idx].add(t.leaf)
    return layers


def layer_saved_bytes(shapes: ModelShapes, leaves: set[str], grad_in: bool, s: StepShape) -> tuple[int, bool]:
    """``(bytes one decoder layer saves for backward, whether its output requires grad)``."""
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
    grad = False
    saved_layers, full = 0, 0
    for leaves in per_layer_leaves:
        b, grad_out = layer_saved_bytes(shapes, leaves, grad, s)
        if grad:  # a layer whose input carries a gradient: the typical one
            full = max(full, b)
        saved_layers += b
        grad = grad_out
    if not full and per_layer_leaves:
        full = max(layer_saved_bytes(shapes, leaves, True, s)[0] for leaves in per_layer_leaves)
    head_saved = (T * shapes.hidden_size * 4 + T * 4 if grad else 0) + T * shapes.vocab_size * 4
    head_transient = 2 * T * shapes.vocab_size * 4
    layer_grads = T * shapes.hidden_size * c
    if s.checkpointing:  # each layer keeps its input hidden states for the recomputation
        return Activations(saved=shapes.num_layers * T * shapes.hidden_size * c + head_saved, per_layer=full,
                           head_saved=head_saved, head_transient=head_transient, layer_grads=layer_grads,
                           recomputed_layer=full)
    return Activations(saved=saved_layers + head_saved, per_layer=full, head_saved=head_saved,
                       head_transient=head_transient, layer_grads=layer_grads, recomputed_layer=0)
