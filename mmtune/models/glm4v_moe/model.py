"""GLM-4.5V (`glm4v_moe`): vision tower + MoE text decoder + lm head, single-device PyTorch.

`model.visual` (vision.py) turns each image into t*h*w/4 LLM-width vectors and each video, split into
its temporal patches as single-step (1, h, w) grids (as transformers does), into h*w/4 vectors per
patch; they replace the `<|image|>` placeholder embeddings in order, images at the placeholders outside
video spans and videos at those inside (`mm_token_types`); `model.language_model` (text.py) runs the decoder on
3D (M-RoPE) positions; `lm_head` gives the logits. Parameter names equal transformers>=5's
`Glm4vMoeForConditionalGeneration` (either loads the other's state dict). Everything around the text
decoder lives in `GlmVForConditionalGeneration`, which the dense GLM-4.1V model (models/glm4v) shares.

Context parallelism (distributed/context_parallel.py) applies from outside at three places: `model.visual`
(each rank encodes a share of the images; all features come back), `model.language_model`'s input (the
embeddings and positions below are computed on the whole sequence, then cut to the rank's tokens; the mask
stays global) and each `TextAttention.attention_fn`. The outputs then hold the rank's tokens only.

Legend: B batch, S tokens per row, H hidden, V vocab, P image patches, I images, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmtune.models.glm4v_moe.checkpoint_names import StateDictAdapter
from mmtune.models.glm4v_moe.config import Glm4vMoeConfig
from mmtune.models.glm4v_moe.rope import get_rope_index, mm_token_types
from mmtune.models.glm4v_moe.text import KVCache, RMSNorm, TextModel
from mmtune.models.glm4v_moe.vision import VisionModel
from mmtune.ops.attention import build_mask
from mmtune.ops.moe import GroupedExperts, TopKRouter


@dataclass
class GlmVOutput:
    logits: torch.Tensor | None  # [B, S, V], None with return_logits=False
    hidden_states: torch.Tensor  # [B, S, H] after the final norm
    router_logits: tuple[torch.Tensor, ...]  # one fp32 [B*S, E] per MoE layer (none for a dense model)
    past_key_values: KVCache | None = None


Glm4vMoeOutput = GlmVOutput


class GlmVModel(nn.Module):
    """`model`: `visual` (GLM-4.5V's vision tower, shared by the whole family) and `language_model`."""

    def __init__(self, config, language_model: nn.Module):
        super().__init__()
        self.visual = VisionModel(config.vision)
        self.language_model = language_model


class GlmVForConditionalGeneration(nn.Module):
    """What the GLM-V family shares around its text decoder: image features merged into the token
    embeddings, 3D positions, the attention mask, the lm head, init and loading. A subclass passes its
    text model (`forward(embeds, position_ids_3BS, mask, cache) -> (hidden, router_logits)`) and names
    its config and state-dict adapter classes (models/__init__.py registers it by model_type)."""

    config_class: type = None
    adapter_class: type = None

    def __init__(self, config, language_model: nn.Module):
        super().__init__()
        self.config = config
        self.model = GlmVModel(config, language_model)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- forward -----------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        return_logits: bool = True,
        run_vision_without_images: bool = False,
        past_key_values: KVCache | None = None,
        use_cache: bool = False,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.Tensor | None = None,
    ) -> GlmVOutput:
        """See docs/INTERNALS.md "Model". `input_ids` [B, S]; `pixel_values` [P, patch_dim] of all images
        in token order with `image_grid_thw` [I, 3]; `pixel_values_videos` / `video_grid_thw` [V, 3] the
        same for videos; `position_ids` [3, B, S] (computed when None); `attention_mask` [B, past + S]
        (1 = token, 0 = pad); `cu_seqlens` int32 segment bounds over the flattened B*S tokens for packed rows."""
        B, S = input_ids.shape
        embeds_BSH = self._embed(input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
                                 run_vision_without_images)

        cache = past_key_values if past_key_values is not None else (KVCache() if use_cache else None)
        num_past = cache.get_seq_length() if cache is not None else 0
        if cache is not None:
            attention_mask = cache.update_mask(attention_mask, B, S, input_ids.device)
        if position_ids is None:
            position_ids = self._position_ids(input_ids, image_grid_thw, video_grid_thw, attention_mask, cache, num_past)
        else:
            if position_ids.dim() == 2:
                position_ids = position_ids[None].expand(3, -1, -1)
            if cache is not None and not num_past:  # decoding continues after the largest given position
                cache.rope_deltas_B1 = position_ids.amax(dim=(0, 2))[:, None] + 1 - S
        mask = build_mask(
            B, S, device=input_ids.device, causal=True, cu_seqlens=cu_seqlens,
            attention_mask_BK=attention_mask, num_past=num_past,
        )
        hidden_BSH, router_logits = self.model.language_model(embeds_BSH, position_ids, mask, cache)
        logits = self.lm_head(hidden_BSH) if return_logits else None
        return GlmVOutput(logits, hidden_BSH, router_logits, cache)

    def _embed(self, input_ids, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw,
               run_vision_without_images) -> torch.Tensor:
        embed = self.model.language_model.embed_tokens
        embeds_BSH = embed(input_ids)
        c = self.config
        pixels, grids, kinds = [], [], []  # one vision tower pass over the images, then the video steps
        for what, px, grid, kind in (("pixel_values", pixel_values, image_grid_thw, 1),
                                     ("pixel_values_videos", pixel_values_videos, video_grid_thw, 2)):
            if px is None:
                continue
            if grid is None:
                raise ValueError(f"{what} given without its grid_thw (one [t, h, w] row per "
                                 f"{'image' if kind == 1 else 'video'})")
            if kind == 2:  # each temporal patch of a video is its own (1, h, w) image
                grid = torch.cat([torch.ones_like(grid[:, :1]), grid[:, 1:]], 1).repeat_interleave(grid[:, 0], 0)
            pixels.append(px)
            grids.append(grid)
            kinds.append(kind)
        if pixels:
            feats_MH = self.model.visual(torch.cat(pixels), torch.cat(grids)).to(embeds_BSH.dtype)
            types_BS = mm_token_types(input_ids, image_token_id=c.image_token_id,
                                      video_start_token_id=c.video_start_token_id, video_end_token_id=c.video_end_token_id)
            merge = c.vision.spatial_merge_size**2
            sizes = [int(g.prod(-1).sum()) // merge for g in grids]
            for kind, feats_mH, grid in zip(kinds, feats_MH.split(sizes), grids):
                # the token rows the features go into, in order (index_copy's backward is one gather of
                # them, where masked_scatter's masks and selects every element of the [B, S, H] gradient)
                rows = (types_BS == kind).flatten().nonzero().squeeze(1)
                n_tokens = rows.numel()
                if n_tokens != feats_mH.shape[0]:
                    where, what = ("outside", "images") if kind == 1 else ("inside", "video steps")
                    raise ValueError(
                        f"input_ids hold {n_tokens} <|image|> tokens (id {c.image_token_id}) {where} video spans but "
                        f"the {what} (grids {grid.tolist()}) give {feats_mH.shape[0]} features"
                    )
                embeds_BSH = embeds_BSH.flatten(0, 1).index_copy(0, rows, feats_mH).view_as(embeds_BSH)
        elif run_vision_without_images:
            # every rank must run the vision tower (FSDP all-gathers its weights), so run a dummy image
            m = c.vision.spatial_merge_size
            dummy = torch.zeros(m * m, c.vision.patch_dim, device=input_ids.device, dtype=embeds_BSH.dtype)
            grid = torch.tensor([[1, m, m]], device=input_ids.device)
            embeds_BSH = embeds_BSH + 0.0 * self.model.visual(dummy, grid).sum().to(embeds_BSH.dtype)
        return embeds_BSH

    def _position_ids(self, input_ids, image_grid_thw, video_grid_thw, attention_mask, cache: KVCache | None,
                      num_past: int):
        """[3, B, S] M-RoPE positions. Prefill (no past): per sample over its unpadded tokens (pads get 0);
        decoding: past length (or the mask's count) + the row's rope delta, like transformers."""
        B, S = input_ids.shape
        device = input_ids.device
        if num_past and cache is not None and cache.rope_deltas_B1 is not None:
            if attention_mask is not None:
                pos_BS = (attention_mask.long().cumsum(-1) - 1)[:, -S:]
            else:
                pos_BS = torch.arange(num_past, num_past + S, device=device).expand(B, S)
            return (pos_BS + cache.rope_deltas_B1.to(device))[None].expand(3, B, S)
        c = self.config
        position_ids = torch.zeros(3, B, S, dtype=torch.long, device=device)
        deltas = []
        types_BS = mm_token_types(input_ids, image_token_id=c.image_token_id,
                                  video_start_token_id=c.video_start_token_id, video_end_token_id=c.video_end_token_id)
        if attention_mask is not None:
            types_BS = types_BS * attention_mask.bool()
        grids = _split_grids(image_grid_thw, (types_BS == 1).sum(1).tolist(), "image", c)
        video_grids = _split_grids(video_grid_thw, (types_BS == 2).sum(1).tolist(), "video", c)
        for b in range(B):
            keep = attention_mask[b].bool() if attention_mask is not None else slice(None)
            pos_3L, delta = get_rope_index(
                input_ids[b][keep], grids[b], video_grids[b],
                image_token_id=c.image_token_id, video_start_token_id=c.video_start_token_id,
                video_end_token_id=c.video_end_token_id, spatial_merge_size=c.vision.spatial_merge_size,
            )
            position_ids[:, b, keep] = pos_3L
            deltas.append(delta)
        if cache is not None:
            cache.rope_deltas_B1 = torch.tensor(deltas, device=device)[:, None]
        return position_ids

    # ---- weights -----------------------------------------------------------------------------
    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Deterministic init (also after `to_empty` from the meta device): normal(0, initializer_range)
        for linear/conv/embedding weights and the stacked experts, ones for norms, zeros for biases and
        the router's score-correction bias."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        for name, module in self.named_modules():
            if module is self.lm_head and self.config.tie_word_embeddings:
                continue  # the embedding's weight, initialised once
            std = self.config.vision.initializer_range if name.startswith("model.visual") else self.config.text.initializer_range
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d, nn.Embedding, TopKRouter)):
                _normal_(module.weight, std, gen)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
                if isinstance(module, nn.Embedding) and module.padding_idx is not None:
                    module.weight[module.padding_idx].zero_()
                if isinstance(module, TopKRouter):
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, GroupedExperts):
                _normal_(module.gate_up_proj, std, gen)
                _normal_(module.down_proj, std, gen)
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)

    @staticmethod
    def state_dict_adapter(config: Glm4vMoeConfig):
        """Hub <-> native names (checkpoint_names.py): how an HF dir's tensors make up this model's."""
        from mmtune.models.glm4v_moe.checkpoint_names import StateDictAdapter

        return StateDictAdapter(config)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> "GlmVForConditionalGeneration":
        from mmtune.models.glm4v_moe.loading import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device)


class Glm4vMoeForConditionalGeneration(GlmVForConditionalGeneration):
    """GLM-4.5V / GLM-4.6V: the MoE text decoder (text.py)."""

    config_class = Glm4vMoeConfig
    adapter_class = StateDictAdapter

    def __init__(self, config: Glm4vMoeConfig):
        super().__init__(config, TextModel(config.text))


def _normal_(t: torch.Tensor, std: float, gen: torch.Generator) -> None:
    """normal(0, std) drawn on the CPU generator (same numbers on every device), copied in."""
    t.copy_(torch.empty(t.shape, dtype=torch.float32).normal_(0.0, std, generator=gen))


def _split_grids(grid_thw, counts: list[int], what: str, c) -> list[torch.Tensor | None]:
    """Split the batch's image (or video) grids, in token order, into each row's by counting the row's
    placeholders (`counts`; video placeholders are those inside video spans)."""
    if grid_thw is None:
        return [None] * len(counts)
    tokens_per_grid = (grid_thw.prod(-1) // c.vision.spatial_merge_size**2).tolist()
    out, g = [], 0
    for b, n in enumerate(counts):
        start = g
        while n > 0 and g < len(tokens_per_grid):
            n -= tokens_per_grid[g]
            g += 1
        if n != 0:
            raise ValueError(f"row {b}: its {what} placeholder tokens do not match the {what} grids "
                             f"{grid_thw.tolist()} in order")
        out.append(grid_thw[start:g] if g > start else None)
    if g != len(tokens_per_grid):
        raise ValueError(f"{len(tokens_per_grid) - g} {what} grid(s) left over after the placeholders of all rows")
    return out
