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
from mmtune.models.glm4v_moe.text import KVCache, RMSNorm, TextAttention, _padding_idx, mrope_angles
from mmtune.ops.attention import AttentionMask


def mrope_cos_sin_pairs(cfg: TextConfig, position_ids_3BS: torch.Tensor, dtype: torch.dtype):
    """cos/sin `[B, S, h]`, one angle per rotary pair (the M-RoPE angles of GLM-4.5V, not repeated)."""
    angles_BSh = mrope_angles(cfg, position_ids_3BS)
    return angles_BSh.cos().to(dtype), angles_BSh.sin().to(dtype)


def apply_interleaved_rope(x_BNSD: torch.Tensor, cos_BSh: torch.Tensor, sin_BSh: torch.Tensor) -> torch.Tensor:
    """Rotate the first R = 2h dims of each head as h adjacent pairs (x[2i], x[2i+1]) by angle i (GPT-J
    layout, transformers' `rotate_half_llm`); the rest pass."""
    h = cos_BSh.shape[-1]
    cos, sin = cos_BSh[:, None], sin_BSh[:, None]
    pairs = x_BNSD[..., : 2 * h].unflatten(-1, (h, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, x_BNSD[..., 2 * h :]], dim=-1)


class _RMSNormFn(torch.autograd.Function):
    """w * (x / rms(x)) with a hand-written backward: saves x and the [.., 1] inverse rms instead of the
    fp32 copies autograd keeps, and runs about half the element-wise ops of autograd's backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        y = x.float() * rstd
        gy = (grad_out * weight).float()
        grad_x = (gy - y * (gy * y).mean(-1, keepdim=True)) * rstd
        grad_w = (grad_out * y.to(grad_out.dtype)).reshape(-1, y.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return grad_x.to(x.dtype), grad_w, None


class FastRMSNorm(RMSNorm):
    """RMSNorm (same parameter, same result as transformers') with `_RMSNormFn`'s cheaper backward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNormFn.apply(x, self.weight, self.eps)


class DenseAttention(TextAttention):
    """GLM-4.5V's attention with interleaved rotary pairs, q/k/v computed by one matmul over the three
    weights (same parameters) and rotated together."""

    apply_rope = staticmethod(apply_interleaved_rope)

    def forward(self, x_BSH, rope, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        N, G, D = self.num_heads, self.num_kv_heads, self.head_dim
        weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
        qkv_BSFD = F.linear(x_BSH, weight, bias).view(B, S, N + 2 * G, D)
        qk_BFSD = apply_interleaved_rope(qkv_BSFD[:, :, : N + G].transpose(1, 2), *rope)
        q_BNSD, k_BGSD = qk_BFSD[:, :N], qk_BFSD[:, N:]
        v_BGSD = qkv_BSFD[:, :, N + G :].transpose(1, 2)
        if cache is not None:
            k_BGSD, v_BGSD = cache.update(self.layer_idx, k_BGSD, v_BGSD)
        o_BNSD = self.attention_fn(q_BNSD, k_BGSD, v_BGSD, mask, scale=D**-0.5)
        return self.o_proj(o_BNSD.transpose(1, 2).reshape(B, S, N * D))


class DenseMLP(nn.Module):
    """down(silu(gate) * up) with gate and up from one fused projection (gate rows first)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DenseDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = DenseAttention(cfg, layer_idx)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = FastRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = FastRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = FastRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = FastRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BSH, rope, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        x_BSH = x_BSH + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x_BSH), rope, mask, cache))
        return x_BSH + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x_BSH)))


class DenseTextModel(nn.Module):
    """`model.language_model`: embeddings, dense decoder layers, final norm (the lm head lives outside)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=_padding_idx(cfg))
        self.layers = nn.ModuleList(DenseDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = FastRMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds_BSH: torch.Tensor,
        position_ids_3BS: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Final hidden states and the router logits (none: a dense model has no router)."""
        rope = mrope_cos_sin_pairs(self.config, position_ids_3BS, inputs_embeds_BSH.dtype)
        h_BSH = inputs_embeds_BSH
        for layer in self.layers:
            h_BSH = layer(h_BSH, rope, mask, cache)
        return self.norm(h_BSH), ()
