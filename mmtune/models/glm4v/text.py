"""GLM-4.1V dense text decoder: GLM-4.5V's attention (GQA, q/k/v biases, partial M-RoPE) with the rotary
pairs interleaved, a fused SwiGLU MLP, and four RMSNorms per layer (a "sandwich": each sublayer's output
is normalised again before it joins the residual stream).

    x = x + post_self_attn_layernorm(self_attn(input_layernorm(x)))
    x = x + post_mlp_layernorm(mlp(post_attention_layernorm(x)))

Parameter names equal transformers>=5's `Glm4vForConditionalGeneration` `model.language_model.*` (docs/GLM45V.md
section 8).

Legend: B batch, S tokens per row, H hidden, N heads, D head dim, R rotary dims, h = R/2 rotary pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.models.glm4v.config import TextConfig
from mmtune.models.glm4v_moe.text import KVCache, RMSNorm, TextAttention, TextModel, mrope_angles
from mmtune.ops.attention import AttentionMask
from mmtune.ops.fused import rope as rotary
from mmtune.ops.fused import swiglu


def mrope_cos_sin_pairs(cfg: TextConfig, position_ids_3BS: torch.Tensor, dtype: torch.dtype):
    """cos/sin `[B, S, h]`, one angle per rotary pair (the M-RoPE angles of GLM-4.5V, not repeated)."""
    angles_BSh = mrope_angles(cfg, position_ids_3BS)
    return angles_BSh.cos().to(dtype), angles_BSh.sin().to(dtype)


def apply_interleaved_rope(x_BNSD: torch.Tensor, cos_BSh: torch.Tensor, sin_BSh: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = 2h dims of each head as h adjacent pairs (x[2i], x[2i+1]) by angle i (GPT-J
    layout, transformers' `rotate_half_llm`); the rest pass. Eagerly in fp32/fp64 each pair is read as one
    complex number and multiplied by cos + i sin, written straight into its place in the output (one pass
    instead of the four products, the stack and the slices of `rotate_pairs`, and no join of the two parts;
    the same products, docs/PERFORMANCE.md "Dense glm4v train step")."""
    h = cos_BSh.shape[-1]
    rot = x_BNSD[..., : 2 * h]
    if _complex_view_ok(rot) and x_BNSD.shape[-1] % 2 == 0:  # an even head dim: the output's pairs too
        out_BNSD = x_BNSD.new_empty(x_BNSD.shape)
        out_BNSD[..., 2 * h :] = x_BNSD[..., 2 * h :]
        turn = torch.complex(cos_BSh, sin_BSh)[:, None]
        pairs = out_BNSD[..., : 2 * h].unflatten(-1, (h, 2))
        torch.mul(torch.view_as_complex(rot.unflatten(-1, (h, 2))), turn, out=torch.view_as_complex(pairs))
        return out_BNSD
    return torch.cat([rotate_pairs(rot, cos_BSh, sin_BSh), x_BNSD[..., 2 * h :]], dim=-1)


def rotate_pairs(x_BNSR: torch.Tensor, cos_BSh: torch.Tensor, sin_BSh: torch.Tensor) -> torch.Tensor:
    """The pair rotation in real arithmetic (bf16/fp16, which have no complex type here, and compiled
    code): (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) for each pair."""
    cos, sin = cos_BSh[:, None], sin_BSh[:, None]
    pairs = x_BNSR.unflatten(-1, (cos.shape[-1], 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)


def _complex_view_ok(x: torch.Tensor) -> bool:
    """Whether `x`'s adjacent pairs can be viewed as complex numbers without a copy (eager fp32/fp64)."""
    return (x.dtype in (torch.float32, torch.float64) and not torch.compiler.is_compiling() and x.stride(-1) == 1
            and x.storage_offset() % 2 == 0 and all(s % 2 == 0 for s in x.stride()[:-1]))


class DenseAttention(TextAttention):
    """GLM-4.5V's attention with interleaved rotary pairs. When q/k/v are plain Linears they run as one
    matmul over the three weights (same parameters) and q, k are rotated together; when any of them is
    wrapped (a LoRA adapter, ops/lora.py) each runs as its own module, so the wrapper takes part."""

    apply_rope = staticmethod(apply_interleaved_rope)

    def _qkv(self, x_BSH: torch.Tensor) -> torch.Tensor:
        """q, k, v side by side: [B, S, (N + 2G) * D]."""
        projs = (self.q_proj, self.k_proj, self.v_proj)
        if all(type(p) is nn.Linear for p in projs):
            weight = torch.cat([p.weight for p in projs])
            bias = None if self.q_proj.bias is None else torch.cat([p.bias for p in projs])
            return F.linear(x_BSH, weight, bias)
        return torch.cat([p(x_BSH) for p in projs], dim=-1)

    def forward(self, x_BSH, rope, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        N, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        # split (not slices): the backward joins the pieces' gradients in one copy, where slicing would
        # zero-fill a full-size gradient per slice and add into it
        qk_BSFD, v_BSGD = self._qkv(x_BSH).view(B, S, N + 2 * G, D).split([N + G, G], dim=2)
        q_BNSD, k_BGSD = rotary(qk_BSFD.transpose(1, 2), *rope, apply_interleaved_rope).split([N, G], dim=1)
        # v copied out of the fused projection's output (G of its N + 2G heads): the attention keeps v for its
        # backward, and a view would keep the whole buffer alive until then (the rotary's q and k are new
        # tensors). Head-major, as the CPU's chunked attention reads it; flash and SDPA take any strides.
        v_BGSD = v_BSGD.transpose(1, 2).contiguous()
        if cache is not None:
            k_BGSD, v_BGSD = cache.update(self.layer_idx, k_BGSD, v_BGSD)
        o_BNSD = self.attention_fn(q_BNSD, k_BGSD, v_BGSD, mask, scale=D**-0.5, backend=self.attn_backend)
        return self.o_proj(o_BNSD.transpose(1, 2).reshape(B, S, N * D))


class DenseMLP(nn.Module):
    """down(silu(gate) * up) with gate and up from one fused projection (gate rows first)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_up_proj(x)))


class DenseDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DenseAttention(cfg, layer_idx)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BSH, rope, mask: AttentionMask, cache: KVCache | None = None) -> tuple[torch.Tensor, None]:
        x_BSH = x_BSH + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x_BSH), rope, mask, cache))
        return x_BSH + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x_BSH))), None


class DenseTextModel(TextModel):
    """`model.language_model`: embeddings, dense decoder layers, final norm (the lm head lives outside);
    no router, so no router logits."""

    layer_class = DenseDecoderLayer
    cos_sin = staticmethod(mrope_cos_sin_pairs)
