"""GLM-4.5V text decoder: GQA attention with q/k/v biases and partial M-RoPE, first-k dense SwiGLU
layers, then MoE layers (sigmoid router, routed experts, one shared expert).

Parameter names equal transformers>=5's `model.language_model.*`.

Legend: B batch, S tokens per row, K keys (past + S), H hidden, N heads, G kv heads, D head dim,
R rotary dims (head_dim * partial_rotary_factor), T = B*S flattened tokens, E experts, V vocab.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.models.glm4v_moe.config import TextConfig
from mmtune.ops.attention import AttentionMask, attention
from mmtune.ops.fused import rms_norm
from mmtune.ops.fused import rope as rotary
from mmtune.ops.moe import GroupedExperts, TopKRouter


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # normalised in fp32, scaled in the input dtype (as transformers), with a cheaper backward (ops/fused.py)
        return rms_norm(x, self.weight, self.eps)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)); the dense MLP, the shared expert and the vision MLP."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def mrope_angles(cfg, position_ids_3BS: torch.Tensor) -> torch.Tensor:
    """fp32 angles `[B, S, R/2]` of the partial M-RoPE: frequency chunk i (sizes `mrope_section`,
    contiguous) takes its angle from position row i (T, H, W). `cfg` needs rotary_dim, rope_theta and
    mrope_section (the MoE and the dense text configs both have them)."""
    R = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, R, 2, dtype=torch.float32, device=position_ids_3BS.device) / R))
    angles_3BSf = position_ids_3BS[..., None].float() * inv_freq
    chunks = angles_3BSf.split(list(cfg.mrope_section), dim=-1)
    return torch.cat([c[i % 3] for i, c in enumerate(chunks)], dim=-1)


def mrope_cos_sin(cfg: TextConfig, position_ids_3BS: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, S, R]` of the partial M-RoPE in NeoX layout (the R/2 angles twice)."""
    angles_BSf = mrope_angles(cfg, position_ids_3BS)
    angles_BSR = torch.cat([angles_BSf, angles_BSf], dim=-1)
    return angles_BSR.cos().to(dtype), angles_BSR.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_partial_rope(x_BNSD: torch.Tensor, cos_BSR: torch.Tensor, sin_BSR: torch.Tensor) -> torch.Tensor:
    """Rotate the first R dims of each head (NeoX halves x1 = [:R/2], x2 = [R/2:R]); the rest pass."""
    half = cos_BSR.shape[-1] // 2
    cos, sin = cos_BSR[:, None, :, :half], sin_BSR[:, None, :, :half]
    x1, x2, rest = x_BNSD[..., :half], x_BNSD[..., half : 2 * half], x_BNSD[..., 2 * half :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class KVCache:
    """Keys and values of the tokens seen so far, per layer, plus the M-RoPE delta of each row
    (decoding positions continue at last position + 1, i.e. cache length + delta)."""

    def __init__(self):
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.rope_deltas_B1: torch.Tensor | None = None
        self.attention_mask_BK: torch.Tensor | None = None

    def get_seq_length(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def update_mask(self, attention_mask_BX: torch.Tensor | None, batch: int, seq: int, device) -> torch.Tensor | None:
        """The padding mask over past + new tokens, stored for the next step. Takes the whole mask
        (HF style), the new tokens' mask only, or none (new tokens are real)."""
        past, num_past = self.attention_mask_BK, self.get_seq_length()
        if attention_mask_BX is None and past is not None:
            attention_mask_BX = torch.ones(batch, seq, dtype=torch.long, device=device)
        if attention_mask_BX is not None and num_past and attention_mask_BX.shape[1] == seq:
            if past is None:
                past = attention_mask_BX.new_ones(batch, num_past)
            attention_mask_BX = torch.cat([past, attention_mask_BX], dim=1)
        self.attention_mask_BK = attention_mask_BX
        return attention_mask_BX

    def update(self, layer_idx: int, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k_BGSD)
            self.values.append(v_BGSD)
        else:
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k_BGSD], dim=2)
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v_BGSD], dim=2)
        return self.keys[layer_idx], self.values[layer_idx]


class TextAttention(nn.Module):
    """GQA with q/k/v biases and partial rotary embeddings. `apply_rope` rotates q and k with the `rope`
    pair the text model computed (NeoX halves here; the dense GLM-4.1V decoder swaps in interleaved pairs)."""

    apply_rope = staticmethod(apply_partial_rope)

    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of num_key_value_heads ({self.num_kv_heads})"
            )
        H, D = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(H, self.num_heads * D, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(H, self.num_kv_heads * D, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(H, self.num_kv_heads * D, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * D, H, bias=False)
        # (q, k, v, mask, scale) -> output; context parallelism replaces it with Ulysses all-to-alls around
        # this function (distributed/context_parallel.py)
        self.attention_fn = attention
        self.attn_backend = "flash"  # ops.attention.BACKENDS; training sets model.json's (train/model_options.py)

    def forward(
        self,
        x_BSH: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        B, S, _ = x_BSH.shape
        q_BNSD = self.q_proj(x_BSH).view(B, S, self.num_heads, self.head_dim).transpose(1, 2)
        k_BGSD = self.k_proj(x_BSH).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v_BGSD = self.v_proj(x_BSH).view(B, S, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q_BNSD, k_BGSD = rotary(q_BNSD, *rope, self.apply_rope), rotary(k_BGSD, *rope, self.apply_rope)
        if cache is not None:
            k_BGSD, v_BGSD = cache.update(self.layer_idx, k_BGSD, v_BGSD)
        o_BNSD = self.attention_fn(q_BNSD, k_BGSD, v_BGSD, mask, scale=self.head_dim**-0.5, backend=self.attn_backend)
        return self.o_proj(o_BNSD.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class MoE(nn.Module):
    """Routed experts + shared expert: out = sum_k w_k expert_k(x) + shared(x)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = TopKRouter(
            cfg.hidden_size,
            cfg.n_routed_experts,
            cfg.num_experts_per_tok,
            n_group=cfg.n_group,
            topk_group=cfg.topk_group,
            norm_topk_prob=cfg.norm_topk_prob,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
        self.experts = GroupedExperts(cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x_BSH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_TH = x_BSH.reshape(-1, x_BSH.shape[-1])
        logits_TE, weights_TK, experts_TK = self.gate(x_TH)
        out_TH = self.experts(x_TH, weights_TK, experts_TK) + self.shared_experts(x_TH)
        return out_TH.view_as(x_BSH), logits_TE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int):
        super().__init__()
        self.self_attn = TextAttention(cfg, layer_idx)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BSH, rope, mask: AttentionMask, cache: KVCache | None = None):
        """Returns the new hidden states and the router logits [T, E] (None for a dense layer)."""
        x_BSH = x_BSH + self.self_attn(self.input_layernorm(x_BSH), rope, mask, cache)
        h_BSH = self.post_attention_layernorm(x_BSH)
        if isinstance(self.mlp, MoE):
            mlp_BSH, router_logits_TE = self.mlp(h_BSH)
        else:
            mlp_BSH, router_logits_TE = self.mlp(h_BSH), None
        return x_BSH + mlp_BSH, router_logits_TE


class TextModel(nn.Module):
    """`model.language_model`: embeddings, decoder layers, final norm (the lm head lives outside). A family
    member with other layers or rotary angles (models/glm4v) sets `layer_class` / `cos_sin`; each layer
    returns (hidden states, its router logits or None)."""

    layer_class: type[nn.Module]  # DecoderLayer (set below the class)
    cos_sin = staticmethod(mrope_cos_sin)

    def __init__(self, cfg):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=_padding_idx(cfg))
        self.layers = nn.ModuleList(self.layer_class(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        inputs_embeds_BSH: torch.Tensor,
        position_ids_3BS: torch.Tensor,
        mask: AttentionMask,
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        rope = self.cos_sin(self.config, position_ids_3BS, inputs_embeds_BSH.dtype)
        h_BSH, router_logits = inputs_embeds_BSH, []
        for layer in self.layers:
            h_BSH, logits_TE = layer(h_BSH, rope, mask, cache)
            if logits_TE is not None:
                router_logits.append(logits_TE)
        return self.norm(h_BSH), tuple(router_logits)


TextModel.layer_class = DecoderLayer


def _padding_idx(cfg: TextConfig) -> int | None:
    pad = cfg.pad_token_id
    return pad if isinstance(pad, int) and 0 <= pad < cfg.vocab_size else None
