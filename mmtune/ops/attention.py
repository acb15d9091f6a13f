"""Attention over padded, packed and cached sequences.

A forward pass describes once which keys each query may see (`AttentionMask`), then every layer
calls `attention(q, k, v, mask)`. Three cases:

- packed rows: `cu_seqlens` (int32 segment bounds over the flattened B*S tokens); causal inside a
  segment, nothing across. On CUDA (bf16/fp16) this runs as one varlen flash call over the flattened
  tokens (`torch.nn.attention.varlen.varlen_attn`); elsewhere as one causal SDPA per segment, which
  on CPU is about 2x faster than SDPA with a block-diagonal mask (4 samples of 128 in 512-token rows)
  and never builds a [B, S, S] mask.
- padded rows: an HF-style `attention_mask` [B, K] (1 = real token) over the keys; causal + padding.
- neither: plain causal (or full, for the vision tower), with an offset when a KV cache holds the past.

Backends (`backend=`, chosen per tower from model.json's attn_implementation, train/model_options.py):
- "flash" (flash_attention_2/3, the default): the varlen flash kernel where it can run (CUDA, bf16/fp16,
  SM80+); on the CPU in fp32 training, plain causal rows big enough (256+ tokens, `chunked_attention.fits`)
  go to ops/chunked_attention.py (faster than SDPA's flash kernel there); else SDPA as below;
- "sdpa": always SDPA (torch picks its fused kernel; packed rows: one flash call per segment on the CPU);
- "eager": SDPA restricted to its plain math kernel (the reference numerics, slowest).

Legend: B batch, S queries per row, K keys per row (past + S), H query heads, G key/value heads,
D head dim, T flattened tokens, N segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmtune.ops import chunked_attention
from mmtune.ops.segment_attention import segment_attention, segment_attention_ok

BACKENDS = ("flash", "sdpa", "eager")


@dataclass
class AttentionMask:
    """Which keys each query sees; built once per forward, shared by all layers.

    `mask_B1SK` is a boolean mask (True = attend; padded rows) or None. Packed rows carry
    `cu_seqlens`, `lengths` and `max_seqlen` instead (varlen kernel, or one SDPA per segment).
    """

    causal: bool
    mask_B1SK: torch.Tensor | None = None
    cu_seqlens: torch.Tensor | None = None
    lengths: list[int] | None = None  # segment lengths of cu_seqlens (python ints, read once per forward)
    max_seqlen: int = 0
    num_past: int = 0


def _check_cu_seqlens(cu_seqlens: torch.Tensor, batch: int, seq: int) -> list[int]:
    """Segment lengths of `cu_seqlens` [N+1]; ValueError unless it rises from 0 to B*S and every row
    boundary is a segment boundary (docs/INTERNALS.md "A training batch")."""
    total = batch * seq
    bounds = cu_seqlens.tolist()
    shown = f"{bounds[:8]}{'...' if len(bounds) > 8 else ''} ending at {bounds[-1] if bounds else None}"
    if not bounds or bounds[0] != 0 or bounds[-1] != total or any(a >= b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise strictly from 0 to batch*seq = {total} (the flattened tokens); got {shown}")
    missing = set(range(seq, total, seq)) - set(bounds)
    if missing:
        raise ValueError(f"cu_seqlens must hold every row boundary (multiples of seq = {seq}); {min(missing)} is missing")
    return [b - a for a, b in zip(bounds, bounds[1:])]


def build_mask(
    batch: int,
    seq: int,
    *,
    device: torch.device,
    causal: bool = True,
    cu_seqlens: torch.Tensor | None = None,
    attention_mask_BK: torch.Tensor | None = None,
    num_past: int = 0,
) -> AttentionMask:
    """The `AttentionMask` of one forward pass (see the module docstring for the three cases)."""
    if cu_seqlens is not None:
        if num_past:
            raise ValueError("packed rows (cu_seqlens) cannot be combined with a KV cache")
        cu_seqlens = cu_seqlens.to(device=device, dtype=torch.int32)
        lengths = _check_cu_seqlens(cu_seqlens, batch, seq)
        return AttentionMask(causal, cu_seqlens=cu_seqlens, lengths=lengths, max_seqlen=max(lengths))
    if attention_mask_BK is not None and not bool(attention_mask_BK.all()):
        keys = num_past + seq
        if attention_mask_BK.shape != (batch, keys):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask_BK.shape)}, expected [batch, past + seq] = "
                f"{[batch, keys]}"
            )
        mask_BSK = attention_mask_BK.to(device=device, dtype=torch.bool)[:, None, :].expand(batch, seq, keys)
        q_S1 = torch.arange(num_past, keys, device=device)[:, None]
        k_1K = torch.arange(keys, device=device)[None, :]
        if causal:
            mask_BSK = mask_BSK & (k_1K <= q_S1)
        # a query with no visible key (a left pad) sees itself, so its (ignored) output stays finite
        mask_BSK = mask_BSK | (k_1K == q_S1)
        return AttentionMask(causal, mask_BSK[:, None], num_past=num_past)
    return AttentionMask(causal, num_past=num_past)


def _with_backend(backend: str, fn, *args):
    """fn(*args) under the SDPA kernels of `backend`: only "eager" restricts them (a context manager only
    then: entering one inside a compiled block would break its graph)."""
    if backend not in BACKENDS:
        raise ValueError(f"attention backend {backend!r} is not one of {BACKENDS}")
    if backend != "eager":
        return fn(*args)
    with sdpa_kernel(SDPBackend.MATH):
        return fn(*args)


def attention(
    q_BHSD: torch.Tensor, k_BGKD: torch.Tensor, v_BGKD: torch.Tensor, mask: AttentionMask, scale: float | None = None,
    backend: str = "flash",
) -> torch.Tensor:
    """Scaled dot-product attention `[B, H, S, D]` with grouped key/value heads (H a multiple of G)."""
    if mask.cu_seqlens is not None and backend == "flash" and _varlen_ok(q_BHSD):
        return _varlen(q_BHSD, k_BGKD, v_BGKD, mask, scale)
    if backend == "flash" and _chunked_ok(q_BHSD, k_BGKD, mask):
        return chunked_attention.chunked_causal_attention(q_BHSD, k_BGKD, v_BGKD, scale)
    return _with_backend(backend, _sdpa, q_BHSD, k_BGKD, v_BGKD, mask, scale)


def _chunked_ok(q_BHSD, k_BGKD, mask: AttentionMask) -> bool:
    """Plain causal self-attention of one sample per row, in training (the kernel keeps the probabilities
    for a backward), where ops/chunked_attention.py runs: the CPU in fp32, problems neither too small nor
    too long."""
    return (mask.causal and mask.cu_seqlens is None and mask.mask_B1SK is None and torch.is_grad_enabled()
            and q_BHSD.requires_grad and chunked_attention.fits(q_BHSD, k_BGKD))


def _sdpa(q_BHSD, k_BGKD, v_BGKD, mask: AttentionMask, scale) -> torch.Tensor:
    B, H, S, D = q_BHSD.shape
    G = k_BGKD.shape[1]
    gqa = H != G
    if mask.cu_seqlens is not None:
        if segment_attention_ok(q_BHSD):  # CPU: one opaque op, whole to torch.compile
            return segment_attention(q_BHSD, k_BGKD, v_BGKD, mask.cu_seqlens, mask.causal, scale)
        return _packed_sdpa(q_BHSD, k_BGKD, v_BGKD, mask.cu_seqlens, mask.causal, scale)
    if mask.mask_B1SK is not None:
        return F.scaled_dot_product_attention(
            q_BHSD, k_BGKD, v_BGKD, attn_mask=mask.mask_B1SK, scale=scale, enable_gqa=gqa
        )
    K = k_BGKD.shape[2]
    if not mask.causal or S == 1:
        return F.scaled_dot_product_attention(q_BHSD, k_BGKD, v_BGKD, scale=scale, enable_gqa=gqa)
    if K == S:
        return F.scaled_dot_product_attention(q_BHSD, k_BGKD, v_BGKD, is_causal=True, scale=scale, enable_gqa=gqa)
    # several new queries after a cached past: causal with an offset
    q_S1 = torch.arange(K - S, K, device=q_BHSD.device)[:, None]
    offset_mask_SK = torch.arange(K, device=q_BHSD.device)[None, :] <= q_S1
    return F.scaled_dot_product_attention(
        q_BHSD, k_BGKD, v_BGKD, attn_mask=offset_mask_SK, scale=scale, enable_gqa=gqa
    )


def attention_per_segment(
    q_HTD: torch.Tensor, k_HTD: torch.Tensor, v_HTD: torch.Tensor, cu_seqlens: torch.Tensor, scale: float | None = None,
    backend: str = "flash",
) -> torch.Tensor:
    """Full (non-causal) attention inside each segment of the flattened tokens (the vision tower's
    per-image attention). `[H, T, D]` in and out. Flash on CUDA: one varlen call; otherwise one SDPA per
    segment (a block-diagonal mask over all patches of a batch of large images would not fit in memory)."""
    if backend == "flash" and _varlen_ok(q_HTD):
        cu = cu_seqlens.to(device=q_HTD.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max())
        q_THD, k_THD, v_THD = (x.transpose(0, 1).contiguous() for x in (q_HTD, k_HTD, v_HTD))
        out_THD = _varlen_attn()(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, scale=scale)
        return out_THD.transpose(0, 1)
    return _with_backend(backend, _segments_sdpa, q_HTD, k_HTD, v_HTD, cu_seqlens, scale)


def _segments_sdpa(q_HTD, k_HTD, v_HTD, cu_seqlens, scale) -> torch.Tensor:
    if segment_attention_ok(q_HTD):
        return segment_attention(q_HTD[None], k_HTD[None], v_HTD[None], cu_seqlens, False, scale)[0]
    # 4-D inputs: SDPA's fused CPU kernel takes [B, H, S, D] only (3-D falls back to the math path)
    return _packed_sdpa(q_HTD[None], k_HTD[None], v_HTD[None], cu_seqlens, False, scale)[0]


@torch.compiler.disable  # a loop over the segments' lengths (Python ints): eager even inside a compiled block
def _packed_sdpa(q_BHSD, k_BGSD, v_BGSD, cu_seqlens: torch.Tensor, causal: bool, scale) -> torch.Tensor:
    """One SDPA per segment of `cu_seqlens` (bounds over the flattened B*S tokens), or one batched call when
    each row is one segment; where `segment_attention` cannot run (CUDA without flash, the math kernel)."""
    B, H, S, D = q_BHSD.shape
    gqa = H != k_BGSD.shape[1]
    if cu_seqlens.numel() == B + 1:  # one segment per row (bounds rise strictly and hold every row boundary)
        return F.scaled_dot_product_attention(q_BHSD, k_BGSD, v_BGSD, is_causal=causal, scale=scale, enable_gqa=gqa)
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    flat = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], B * S, D)  # noqa: E731  [1, heads, T, D]
    out_1HTD = _sdpa_segments(flat(q_BHSD), flat(k_BGSD), flat(v_BGSD), lengths, causal, scale)
    return out_1HTD[0].view(H, B, S, D).transpose(0, 1)


def _sdpa_segments(q_1HTD, k_1GTD, v_1GTD, lengths: list[int], causal: bool, scale) -> torch.Tensor:
    """One SDPA per segment of the flattened tokens, concatenated back: `[1, H, T, D]`."""
    gqa = q_1HTD.shape[1] != k_1GTD.shape[1]
    if len(lengths) == 1:
        return F.scaled_dot_product_attention(q_1HTD, k_1GTD, v_1GTD, is_causal=causal, scale=scale, enable_gqa=gqa)
    outs = [
        F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=gqa)
        for q, k, v in zip(*(t.split(lengths, dim=2) for t in (q_1HTD, k_1GTD, v_1GTD)))
    ]
    return torch.cat(outs, dim=2)


# ---- CUDA varlen (flash) path ------------------------------------------------------------------


def _varlen_attn():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _varlen_ok(q: torch.Tensor) -> bool:
    """Flash varlen needs fp16/bf16 on an SM80+ GPU and torch's varlen module; otherwise SDPA runs."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if torch.cuda.get_device_capability(q.device) < (8, 0):
        return False
    try:
        _varlen_attn()
    except ImportError:
        return False
    return True


def _varlen(q_BHSD, k_BGKD, v_BGKD, mask: AttentionMask, scale) -> torch.Tensor:
    B, H, S, D = q_BHSD.shape
    flat = lambda x: x.transpose(1, 2).reshape(B * S, x.shape[1], D)  # noqa: E731  [T, heads, D]
    window = (-1, 0) if mask.causal else (-1, -1)
    out_THD = _varlen_attn()(
        flat(q_BHSD), flat(k_BGKD), flat(v_BGKD), mask.cu_seqlens, mask.cu_seqlens, mask.max_seqlen,
        mask.max_seqlen, scale=scale, window_size=window, enable_gqa=H != k_BGKD.shape[1],
    )
    return out_THD.view(B, S, H, D).transpose(1, 2)
