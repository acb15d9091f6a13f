"""Ulysses context parallelism: the `cp` ranks of a group hold one micro-batch together, each S/cp of
every row's tokens, and attention still sees the whole sequence (docs/INTERNALS.md "Context parallelism").

Every rank of the group reads the same micro-batch (ParallelDims gives them one dp rank). The trainer pads
S to a multiple of cp (`ContextParallel.pad_batch`; padding is never labelled and never counted). The model
then runs as on one device, except at three places that `apply_context_parallel` takes over from outside:

1. the vision tower (`model.model.visual`, forward hooks): each rank encodes a contiguous share of the
   batch's images (balanced by patches; a rank without one encodes a dummy so that FSDP's collectives
   match) and the features of all images are all-gathered, with the gradient summed back to the rank that
   encoded each image — so a trainable tower trains exactly as on one rank;
2. the decoder's input (`model.model.language_model`, a forward pre-hook): the token embeddings, merged
   with the image features over the WHOLE sequence, and the 3D positions, computed on the whole sequence,
   are cut to this rank's S/cp tokens of each row (`ContextParallel.local`). The attention mask (packed
   rows' `cu_seqlens`) stays global;
3. attention (`TextAttention.attention_fn`, replaced by `UlyssesAttention`): one all-to-all turns the
   rank's q/k/v of all heads for its S/cp tokens into all S tokens for N/cp heads; attention runs with the
   global mask; a second all-to-all turns the output back. Key/value heads are repeated first when cp
   does not divide their number (GLM-4.5V: 8 KV heads, cp 16 -> each repeated twice).

Everything else (norms, MLPs, experts, the lm head) is per token and runs on the local tokens; the output
`hidden_states` / `router_logits` hold this rank's tokens. The loss weights are computed on the whole
micro-batch and cut the same way (train/loss.py); the router aux loss sums its statistics over the group.

All collectives are autograd functions whose backward is the adjoint collective; every rank of the group
runs them in the same order (same graph), in forward, backward and activation-checkpoint recompute.

Legend: B rows, S tokens per row, s = S/cp local tokens, N query heads, G key/value heads, n = heads/cp,
D head dim, H hidden, P patches, C patch_dim, M image tokens (merged patches), I images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from mmtune.ops.attention import AttentionMask

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ContextParallel:
    """One rank's view of its context-parallel group."""

    group: dist.ProcessGroup
    size: int
    rank: int

    @classmethod
    def from_mesh(cls, mesh: DeviceMesh | None) -> "ContextParallel | None":
        """From ParallelDims.cp_mesh (None when cp is 1: no context parallelism)."""
        if mesh is None or mesh.size() == 1:
            return None
        return cls(mesh.get_group(), mesh.size(), mesh.get_local_rank())

    def local(self, x: Tensor, dim: int) -> Tensor:
        """This rank's contiguous share (1/cp) of the tokens along `dim` (a view)."""
        n, rem = divmod(x.shape[dim], self.size)
        if rem:
            raise ValueError(f"context parallelism: {x.shape[dim]} tokens per row is not a multiple of "
                             f"--context-parallel-size {self.size}; pad the batch first (ContextParallel.pad_batch)")
        return x.narrow(dim, self.rank * n, n)

    def pad_batch(self, batch: dict[str, Any], token_mask_BS: Tensor | None, pad_id: int | None
                  ) -> tuple[dict[str, Any], Tensor]:
        """Pad every row at its end to a multiple of cp tokens: pad ids, no labels, positions 0.., and in a
        packed batch one more `cu_seqlens` segment per row. Returns the batch and the token mask (True =
        a real token, for throughput and the aux loss; False on the padding)."""
        ids_BS = batch["input_ids"]
        B, S = ids_BS.shape
        if token_mask_BS is None:
            token_mask_BS = torch.ones_like(ids_BS, dtype=torch.bool)
        extra = -S % self.size
        if not extra:
            return batch, token_mask_BS
        out = dict(batch)
        out["input_ids"] = F.pad(ids_BS, (0, extra), value=0 if pad_id is None else pad_id)
        out["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
        pos = batch.get("position_ids")
        if pos is not None:  # [3, B, S] or [B, S]: a pad run counts from 0 (as the collator's)
            tail = torch.arange(extra, device=pos.device, dtype=pos.dtype).expand(*pos.shape[:-1], extra)
            out["position_ids"] = torch.cat([pos, tail], dim=-1)
        cu = batch.get("cu_seqlens")
        if cu is not None:
            out["cu_seqlens"] = _pad_cu_seqlens(cu, B, S, S + extra)
        return out, F.pad(token_mask_BS, (0, extra), value=False)


def _pad_cu_seqlens(cu: Tensor, B: int, S: int, S2: int) -> Tensor:
    """Segment bounds over B*S flattened tokens -> over B*S2 after padding each row from S to S2 tokens;
    each row's padding becomes a segment of its own."""
    x = cu.long()
    row = (x - 1).clamp(min=0) // S  # the row of the token just before each bound
    mapped = torch.where(x == 0, x, row * S2 + x - row * S)
    ends = torch.arange(1, B + 1, device=cu.device) * S2
    return torch.unique(torch.cat([mapped, ends])).to(cu.dtype)  # sorted


# ---- collectives with autograd -----------------------------------------------------------------------


def _all_to_all(x: Tensor, group, size: int, scatter_dim: int, gather_dim: int) -> Tensor:
    """Chunk j of `x` along scatter_dim goes to rank j; the chunks received are concatenated along
    gather_dim in rank order."""
    send = torch.stack(x.chunk(size, dim=scatter_dim)).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, group, size: int, scatter_dim: int, gather_dim: int) -> Tensor:
        ctx.args = (group, size, scatter_dim, gather_dim)
        return _all_to_all(x, group, size, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group, size, scatter_dim, gather_dim = ctx.args  # the inverse exchange
        return _all_to_all(grad, group, size, gather_dim, scatter_dim), None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """y = sum over the group of x; the gradient of x is the sum over the group of the gradients of y."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        y = x.clone()
        dist.all_reduce(y, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor):
        g = grad.clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """Sum over the group, differentiable (the router aux loss's per-expert probabilities)."""
    return _AllReduceSum.apply(x, group)


def _gather_rows(x_RO: Tensor, counts: list[int], group) -> Tensor:
    """Every rank's rows (rank r holds counts[r] of them) concatenated in rank order."""
    padded = F.pad(x_RO, (0, 0, 0, max(counts) - x_RO.shape[0])).contiguous()  # all_gather wants equal shapes
    bufs = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(bufs, padded, group=group)
    return torch.cat([b[:c] for b, c in zip(bufs, counts)])


class _GatherRows(torch.autograd.Function):
    """`_gather_rows`; backward sums the gradient over the group and returns this rank's rows."""

    @staticmethod
    def forward(ctx, x_RO: Tensor, counts: list[int], group, rank: int) -> Tensor:
        ctx.args = (counts, group, rank)
        return _gather_rows(x_RO, counts, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        counts, group, rank = ctx.args
        g = grad.contiguous().clone()
        dist.all_reduce(g, group=group)
        start = sum(counts[:rank])
        return g[start : start + counts[rank]], None, None, None


# ---- attention ---------------------------------------------------------------------------------------


class UlyssesAttention:
    """`TextAttention.attention_fn` under context parallelism: [B, heads, s, D] of this rank's tokens in,
    the same out; in between, the wrapped attention sees all S tokens of heads/cp heads."""

    def __init__(self, cp: ContextParallel, num_heads: int, num_kv_heads: int, attention_fn: Callable):
        if num_heads % cp.size:
            raise ValueError(f"--context-parallel-size {cp.size} must divide num_attention_heads {num_heads}")
        self.cp, self.attention_fn = cp, attention_fn
        # each rank needs whole key/value heads for its query heads: repeat them until cp divides their number
        if num_kv_heads % cp.size == 0:
            self.kv_repeat = 1
        elif cp.size % num_kv_heads == 0:
            self.kv_repeat = cp.size // num_kv_heads  # one (repeated) KV head per rank
        else:
            self.kv_repeat = num_heads // num_kv_heads  # as many KV heads as query heads
        assert (num_kv_heads * self.kv_repeat) % cp.size == 0

    def __call__(self, q_BNsD: Tensor, k_BGsD: Tensor, v_BGsD: Tensor, mask: AttentionMask,
                 scale: float | None = None) -> Tensor:
        if self.kv_repeat > 1:
            k_BGsD = k_BGsD.repeat_interleave(self.kv_repeat, dim=1)
            v_BGsD = v_BGsD.repeat_interleave(self.kv_repeat, dim=1)
        q_BnSD, k_BgSD, v_BgSD = self._seq_to_heads(q_BNsD, k_BGsD, v_BGsD)
        o_BnSD = self.attention_fn(q_BnSD, k_BgSD, v_BgSD, mask, scale=scale)
        cp = self.cp
        return _AllToAll.apply(o_BnSD, cp.group, cp.size, 2, 1)  # scatter the tokens, gather the heads

    def _seq_to_heads(self, *qkv: Tensor) -> tuple[Tensor, ...]:
        """One all-to-all for q, k and v: rank j gets heads chunk j of each, for the tokens of every rank."""
        cp = self.cp
        parts = [t.unflatten(1, (cp.size, t.shape[1] // cp.size)) for t in qkv]  # [B, cp, heads/cp, s, D]
        x_BcHsD = torch.cat(parts, dim=2)
        y_B1HSD = _AllToAll.apply(x_BcHsD, cp.group, cp.size, 1, 3)  # scatter the heads, gather the tokens
        return y_B1HSD.squeeze(1).split([p.shape[2] for p in parts], dim=1)


# ---- vision tower and decoder input ------------------------------------------------------------------


def image_owners(patches_I: list[int], size: int) -> list[int]:
    """Which rank encodes each image: contiguous runs of images with about total/size patches per rank
    (an image goes to the rank whose share holds its middle patch)."""
    total, before, owners = sum(patches_I), 0, []
    for p in patches_I:
        owners.append(min(size - 1, int(size * (before + p / 2) / max(total, 1))))
        before += p
    return owners


class _VisionShare:
    """Forward hooks on the vision tower: encode this rank's share of the images, return all features."""

    def __init__(self, cp: ContextParallel, visual: nn.Module):
        self.cp = cp
        cfg = visual.config
        self.merge, self.patch_dim = cfg.spatial_merge_size, cfg.patch_dim
        self.pending: list[tuple[list[int], bool]] = []  # (features per rank, this rank encoded a dummy)

    def before(self, module: nn.Module, args: tuple) -> tuple:
        pixels_PC, grid_I3 = args[:2]
        patches_I = grid_I3.prod(-1).tolist()
        owners = image_owners(patches_I, self.cp.size)
        counts = [0] * self.cp.size
        for owner, p in zip(owners, patches_I):
            counts[owner] += p // self.merge**2
        mine = [i for i, owner in enumerate(owners) if owner == self.cp.rank]
        self.pending.append((counts, not mine))
        if not mine:  # FSDP gathers the tower's weights on every rank: run it on one dummy merge block
            m = self.merge
            dummy = pixels_PC.new_zeros(m * m, self.patch_dim)
            return (dummy, grid_I3.new_tensor([[1, m, m]]), *args[2:])
        first = sum(patches_I[: mine[0]])
        rows = sum(patches_I[i] for i in mine)
        return (pixels_PC[first : first + rows], grid_I3[mine[0] : mine[-1] + 1], *args[2:])

    def after(self, module: nn.Module, args: tuple, feats_MO: Tensor) -> Tensor:
        counts, dummy = self.pending.pop()
        # a dummy contributes no rows; the empty slice still takes the tower into the backward (FSDP)
        local = feats_MO[:0] if dummy else feats_MO
        cp = self.cp
        if local.requires_grad:
            return _GatherRows.apply(local, counts, cp.group, cp.rank)
        return _gather_rows(local, counts, cp.group)  # frozen tower and projector: no gradient to send back


_DECODER_ARGS = ("inputs_embeds_BSH", "position_ids_3BS", "mask", "cache")


def _decoder_input_hook(cp: ContextParallel):
    """Forward pre-hook of the decoder (TextModel): keep this rank's S/cp tokens of the embeddings and of
    the 3D positions (both computed on the whole sequence); the mask stays global."""

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = {**dict(zip(_DECODER_ARGS, args)), **kwargs}
        if bound.get("cache") is not None:
            raise ValueError("context parallelism is for training: a KV cache (generation) runs on one rank")
        # a copy: the share must not keep the whole sequence's embeddings alive until backward
        bound["inputs_embeds_BSH"] = cp.local(bound["inputs_embeds_BSH"], 1).clone()
        bound["position_ids_3BS"] = cp.local(bound["position_ids_3BS"], 2)
        return (), bound

    return hook


def apply_context_parallel(model: nn.Module, cp_mesh: DeviceMesh) -> nn.Module:
    """Install Ulysses context parallelism on a GLM-4.5V model, in place (see the module docstring).
    Parameters and their names do not change; FSDP2 and activation checkpointing apply as before."""
    cp = ContextParallel.from_mesh(cp_mesh)
    if cp is None:
        return model
    inner = model.model
    visual, text = inner.visual, inner.language_model
    share = _VisionShare(cp, visual)
    visual.register_forward_pre_hook(share.before)
    visual.register_forward_hook(share.after)
    text.register_forward_pre_hook(_decoder_input_hook(cp), with_kwargs=True)
    for layer in text.layers:
        attn = layer.self_attn
        attn.attention_fn = UlyssesAttention(cp, attn.num_heads, attn.num_kv_heads, attn.attention_fn)
    return model
