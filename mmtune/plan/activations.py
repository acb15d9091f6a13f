"""What a training step keeps for backward, per token, with mmtune's ops: the activation model of
`mmtune plan` (checked against measured CPU steps in tests/test_plan.py; figures in docs/PERFORMANCE.md).

Legend: h hidden size, q = heads x head_dim, kv = KV heads x head_dim, N attention heads, R rotary dims,
k routed experts per token, I the MoE expert's (or the dense MLP's) intermediate size, i_s the shared
expert's, E routed experts, c bytes per value of the compute dtype; fp32 values are 4 bytes.

A decoder layer saves, per token (`decoder_layer_bytes_per_token`; no recompute):
  c x [ (norms + 2) h      each RMSNorm's input (ops/fused.rms_norm keeps x and a fp32 inverse rms), and the
                           outputs of the input and post-attention norms (the projections' input)
        + 3q + 2kv         v, the rotated q and k (ops/fused.rope keeps only cos/sin, so the q/k projections'
                           outputs are freed), the attention output (with its fp32 log-sum-exp, N values) and
                           o_proj's input: the output made token-major, a copy where the kernel writes it
                           head-major (the CPU's; CUDA flash kernels write it token-major and o_proj reads a
                           view: there this q is not allocated, the estimate is high by it)
                           (GLM-4.1V's fused q/k/v projection: v is copied out of its output, which is freed)
        + MLP ]            dense SwiGLU: gate and up outputs, the activation, the product down_proj keeps: 4I
                           MoE: per routed slot the token's row, gate/up (2I), the activation, the product and
                           the product scaled by the routing weight (down's input): k (h + 5I); the shared
                           expert as a dense SwiGLU: 4 i_s
  + fp32 x [ norms + N     the inverse rms of each norm, the attention's log-sum-exp
             + h + E + 2k  MoE router: its fp32 input (a copy when c < 4), the sigmoid scores, the chosen
                           scores and the routing weights ]
(int64 routing indices, 3k per token, are left out: under 1% of a MoE layer.)

Besides the layers: each MoE layer's router logits (fp32, returned by the model for the aux loss and the
expert-load count, alive until after backward), the rope cos/sin shared by all layers, and the final norm's
input and output.

With full recompute a layer keeps only its input between its forward and its backward. Its backward first
recomputes its forward and then runs it backward; at its largest moment it holds
(`layer_working_bytes_per_token`) its saved tensors (its input is counted among the kept inputs), the
gradient arriving from the layer above, and its largest set of temporaries (`_temporaries`):
  MoE     the routed combine (ops/fused.unpermute_sum) of the recomputed forward has the experts' outputs in
          expert order and their copy in token order, 2k rows of h, and their [T, h] sum alive, while the
          shared expert (run after it) has saved nothing yet: 2kh + h - 4 i_s. The experts' backward holds the
          rows' gradient and the down projection's input gradient, k (h + I), plus the token gradient, after
          the shared expert's backward freed its tensors: kh + kI + h - 4 i_s. The larger of the two.
  dense   the SwiGLU backward: the down projection's input gradient takes the place of the product it saved
          (freed); autograd's SwiGLU (GLM-4.5V's dense layers) then holds the gradients of the activation's two
          factors, 2I; GLM-4.1V's ops/fused.swiglu (`fused_projections`) a [.., 2I] buffer for both halves'
          gradients and grad x up, 3I.
Without recompute a layer's backward holds the same gradient and temporaries on top of every saved tensor of
the layers below it (the combine's moment then lies in the forward, with less alive: an upper bound).
estimate.py finds the step's peak over its phases (forward and loss, each layer's backward, the optimizer
step). A GLM-4.5V MoE layer in bf16 follows the same count as the tiny fp32 ones the tests measure:
bench/plan_memory.py measures one at 1/8 of GLM-4.5V's width within 1% of it.
"""

from __future__ import annotations

import torch

from mmtune.config_files import DTYPE_NAMES
from mmtune.models.glm4v_moe.config import VisionConfig

DTYPE_BYTES = {name: getattr(torch, attr).itemsize for name, attr in DTYPE_NAMES.items()}  # --compute-dtype names
FP32 = 4


def decoder_layer_bytes_per_token(t, layer_idx: int, act_bytes: int, kv_repeat: int = 1) -> float:
    """Bytes autograd saves for backward in one decoder layer, per token (no recompute; module docstring).
    With context parallelism the attention's own copies of k/v hold `kv_repeat` times the KV heads."""
    c, h = act_bytes, t.hidden_size
    q, kv = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    norms = getattr(t, "norms_per_layer", 2)
    attn = (norms + 2) * h + 3 * q + 2 * kv + 2 * kv * (kv_repeat - 1)
    fp32 = norms + t.num_attention_heads
    if t.is_moe_layer(layer_idx):
        k, i_m, i_s = t.num_experts_per_tok, t.moe_intermediate_size, t.moe_intermediate_size * t.n_shared_experts
        mlp = k * (h + 5 * i_m) + 4 * i_s
        fp32 += (h if c < FP32 else 0) + t.n_routed_experts + 2 * k
    else:
        mlp = 4 * t.intermediate_size
    return c * (attn + mlp) + FP32 * fp32


def _temporaries(t, layer_idx: int) -> int:
    """Values per token a layer's backward holds beyond its saved tensors and the incoming gradient, at its
    largest moment (module docstring)."""
    h = t.hidden_size
    if not t.is_moe_layer(layer_idx):
        return (3 if getattr(t, "fused_projections", False) else 2) * t.intermediate_size
    k, i_m, i_s = t.num_experts_per_tok, t.moe_intermediate_size, t.moe_intermediate_size * t.n_shared_experts
    routed = k * h + k * max(h, i_m) + h - 4 * i_s  # the combine, or the experts' backward
    return max(routed, 2 * i_s)  # or the shared expert's own backward


def layer_backward_extra_bytes_per_token(t, layer_idx: int, act_bytes: int) -> float:
    """Bytes per token one layer's backward holds beyond its saved tensors: the gradient from the layer above
    and its largest set of temporaries."""
    return act_bytes * (t.hidden_size + _temporaries(t, layer_idx))


def layer_working_bytes_per_token(t, layer_idx: int, act_bytes: int, kv_repeat: int = 1, extra: float = 0.0) -> float:
    """Bytes per token a layer holds at its largest moment under full recompute (recomputed forward + its
    backward), beyond its input (kept by the checkpoint, counted with the kept inputs). `extra`: bytes per
    token it saves besides `decoder_layer_bytes_per_token` (LoRA's [tokens, r] intermediates)."""
    saved = decoder_layer_bytes_per_token(t, layer_idx, act_bytes, kv_repeat) + extra
    return saved - act_bytes * t.hidden_size + layer_backward_extra_bytes_per_token(t, layer_idx, act_bytes)


def kept_bytes_per_token(t, act_bytes: int) -> float:
    """Bytes per token the decoder keeps from its forward to the end of its backward besides its layers'
    saved tensors: every MoE layer's router logits (fp32) and the rope cos/sin."""
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    logits = FP32 * t.n_routed_experts * moe_layers if moe_layers else 0
    return logits + act_bytes * 2 * t.rotary_dim


def final_norm_bytes_per_token(t, act_bytes: int) -> float:
    """The final norm's input and output (+ its fp32 inverse rms): alive from the forward until the loss's
    backward has passed them."""
    return act_bytes * 2 * t.hidden_size + FP32


def vision_block_bytes_per_patch(v: VisionConfig, act_bytes: int) -> float:
    """Bytes one vision block saves per patch: norms, qkv, rotated q/k, attention output, SwiGLU MLP."""
    h = v.hidden_size
    return act_bytes * (2 * h + 3 * h + 2 * h + h + 2 * h + 3 * v.intermediate_size)
