"""GLM-4.5V vision tower (`model.visual`): patch embed -> RMSNorm -> + learned 2D position embedding
(bicubically resampled to each image's patch grid) -> blocks (2D-rotary attention inside each image,
SwiGLU) -> RMSNorm -> 2x2 downsample conv -> merger (proj, LayerNorm, GELU, SwiGLU) -> LLM tokens.

`pixel_values` rows come merge-block-major: for each image, (h/2, w/2, 2, 2) patches, each row a
flattened (C, T, P, P) patch (docs/GLM45V.md section 2). Parameter names equal transformers>=5's.

Legend: P patches (rows of pixel_values, all images), C patch_dim (C*T*P*P), D vision hidden,
N heads, Dh head dim, O out_hidden_size (the LLM width), M = P/4 merged tokens, I images.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.models.glm4v_moe.config import VisionConfig
from mmtune.models.glm4v_moe.text import RMSNorm, SwiGLU, _rotate_half
from mmtune.ops.attention import attention_per_segment


def vision_rope_theta(cfg: VisionConfig) -> float:
    rope = cfg.extra.get("rope_parameters") or {}
    return float(rope.get("rope_theta", cfg.extra.get("rope_theta", 10000.0)))


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride over one patch, i.e. a Linear on the C-wide rows; the
    weight keeps the Conv3d shape [D, C, T, P, P] so checkpoints load unchanged."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k)

    def forward(self, pixels_PC: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return F.linear(pixels_PC.to(w.dtype), w.view(w.shape[0], -1), self.proj.bias)


class PositionEmbedding(nn.Module):
    """`embeddings.position_embedding`: an image_size/patch_size square grid of learned vectors,
    resampled bicubically (align_corners False, border padding) at each patch's centre of its image's grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.side**2, cfg.hidden_size)

    def forward(self, x_PD: torch.Tensor, hw_P2: torch.Tensor, grid_hw_P2: torch.Tensor) -> torch.Tensor:
        weight = self.position_embedding.weight
        table_1DSS = weight.float().view(self.side, self.side, -1).permute(2, 0, 1)[None]
        centre_P2 = (hw_P2.float() + 0.5) / grid_hw_P2.float() * 2 - 1  # in [-1, 1]
        grid_1P12 = centre_P2.flip(-1)[None, :, None, :]  # grid_sample wants (x=w, y=h)
        pos_1DP1 = F.grid_sample(table_1DSS, grid_1P12, mode="bicubic", align_corners=False, padding_mode="border")
        return x_PD + pos_1DP1[0, :, :, 0].T.to(weight.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=False)

    def forward(self, x_PD: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor):
        P = x_PD.shape[0]
        q_PND, k_PND, v_PND = self.qkv(x_PD).view(P, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = cos_sin[0][:, None], cos_sin[1][:, None]
        q_PND = (q_PND.float() * cos + _rotate_half(q_PND.float()) * sin).to(x_PD.dtype)
        k_PND = (k_PND.float() * cos + _rotate_half(k_PND.float()) * sin).to(x_PD.dtype)
        o_NPD = attention_per_segment(
            q_PND.transpose(0, 1), k_PND.transpose(0, 1), v_PND.transpose(0, 1), cu_seqlens, scale=self.head_dim**-0.5
        )
        return self.proj(o_NPD.transpose(0, 1).reshape(P, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        # transformers sizes the vision MLP by out_hidden_size (not intermediate_size); checkpoints agree
        self.mlp = SwiGLU(cfg.hidden_size, cfg.out_hidden_size)

    def forward(self, x_PD, cos_sin, cu_seqlens):
        x_PD = x_PD + self.attn(self.norm1(x_PD), cos_sin, cu_seqlens)
        return x_PD + self.mlp(self.norm2(x_PD))


class PatchMerger(nn.Module):
    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)
        self.gate_proj = nn.Linear(dim, context_dim, bias=False)
        self.up_proj = nn.Linear(dim, context_dim, bias=False)
        self.down_proj = nn.Linear(context_dim, dim, bias=False)

    def forward(self, x_MO: torch.Tensor) -> torch.Tensor:
        x_MO = F.gelu(self.post_projection_norm(self.proj(x_MO)))
        return self.down_proj(F.silu(self.gate_proj(x_MO)) * self.up_proj(x_MO))


class VisionModel(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.merge = cfg.spatial_merge_size
        self.embeddings = PositionEmbedding(cfg)
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.intermediate_size)
        self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, pixels_PC: torch.Tensor, grid_thw_I3: torch.Tensor) -> torch.Tensor:
        """LLM-width features `[M, O]` of all images, in order (t*h*w/merge^2 tokens per image)."""
        hw_P2, grid_hw_P2, cu_seqlens = self._patch_layout(grid_thw_I3, pixels_PC.shape[0], pixels_PC.device)
        x_PD = self.post_conv_layernorm(self.patch_embed(pixels_PC))
        x_PD = self.embeddings(x_PD, hw_P2, grid_hw_P2)
        cos_sin = self._rope(hw_P2)
        for block in self.blocks:
            x_PD = block(x_PD, cos_sin, cu_seqlens)
        x_PD = self.post_layernorm(x_PD)
        # the 2x2 conv over each merge block (its 4 consecutive rows) is a Linear on the (2, 2, D) rows
        w = self.downsample.weight  # [O, D, m, m]
        x_MmmD = x_PD.reshape(-1, self.merge * self.merge * x_PD.shape[-1])
        x_MO = F.linear(x_MmmD, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.downsample.bias)
        return self.merger(x_MO)

    def _patch_layout(self, grid_thw_I3: torch.Tensor, num_patches: int, device):
        """Per patch: its (row, col) in its image's grid, that grid's (h, w); and per-frame cu_seqlens."""
        m = self.merge
        hw, grid_hw, lengths = [], [], []
        for t, h, w in grid_thw_I3.tolist():
            if h % m or w % m:
                raise ValueError(f"image grid {(t, h, w)}: h and w must be multiples of spatial_merge_size {m}")
            rows = torch.arange(h).view(h // m, m, 1, 1).expand(h // m, m, w // m, m)
            cols = torch.arange(w).view(1, 1, w // m, m).expand(h // m, m, w // m, m)
            rc = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
            hw.append(rc.repeat(t, 1))
            grid_hw.append(torch.tensor([h, w]).expand(t * h * w, 2))
            lengths += [h * w] * t
        if sum(lengths) != num_patches:
            raise ValueError(
                f"pixel_values has {num_patches} rows but image_grid_thw {grid_thw_I3.tolist()} needs {sum(lengths)}"
            )
        cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
        return torch.cat(hw).to(device), torch.cat(grid_hw).to(device), cu.to(device)

    def _rope(self, hw_P2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """2D rotary angles `[P, Dh]`: Dh/4 frequencies on the row, Dh/4 on the column, twice (NeoX)."""
        half = self.config.head_dim // 2
        inv_freq = 1.0 / (
            vision_rope_theta(self.config) ** (torch.arange(0, half, 2, dtype=torch.float32, device=hw_P2.device) / half)
        )
        angles_P2f = hw_P2[..., None].float() * inv_freq
        angles_Ph = angles_P2f.flatten(1)  # [row freqs, col freqs]
        angles_PDh = torch.cat([angles_Ph, angles_Ph], dim=-1)
        return angles_PDh.cos(), angles_PDh.sin()
