"""Attention inside the segments of packed rows on the CPU, as one op that torch.compile sees whole.

Packed rows hold several samples; each attends only inside its own segment (`cu_seqlens`, bounds over
the flattened B*S tokens, never across a row boundary: ops/attention.py checks it). On CUDA the varlen
flash kernel does this in one call. On the CPU the fastest form is one flash-attention call per segment
(about 2x a block-diagonal mask over the row), but a Python loop over the segments cannot be traced:
the number and lengths of the segments change every step, so torch.compile would either graph-break
or recompile per batch. Hence a custom op (`mmtune::segment_attention`) that loops inside: the compiler
treats it as one opaque kernel with a fixed output shape, whatever the segments are.

Forward and backward call torch's own CPU flash-attention kernels (the ones `scaled_dot_product_attention`
dispatches to on the CPU) per segment on strided views — no copy of q/k/v, and the backward reuses the
forward's log-sum-exp instead of recomputing. Grouped key/value heads (G < H) are native to the kernel.

Legend: B rows, H query heads, G key/value heads, S tokens per row, D head dim.
"""

from __future__ import annotations

import torch

_FWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BWD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _segments(cu_seqlens: torch.Tensor, S: int):
    """(row, start, end) of every segment, positions within the row."""
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds, bounds[1:]):
        row = a // S
        yield row, a - row * S, b - row * S


def _one_per_row(cu_seqlens: torch.Tensor, B: int) -> bool:
    return cu_seqlens.numel() == B + 1  # bounds rise strictly and hold every row boundary


def _new_like_out(q: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] stored as [B, S, H, D] (what the kernel writes; the caller's transpose is then a view)."""
    B, H, S, D = q.shape
    return q.new_empty(B, S, H, D).transpose(1, 2)


def _like(t: torch.Tensor, layout: torch.Tensor) -> torch.Tensor:
    """`t` in the strides of `layout` (what the op's fake implementation promises the compiler)."""
    return t if t.stride() == layout.stride() else layout.copy_(t)


@torch.library.custom_op("mmtune::segment_attention", mutates_args=(), device_types="cpu")
def _segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    B, H, S, _ = q.shape
    if _one_per_row(cu_seqlens, B):
        out, lse = _FWD(q, k, v, 0.0, causal, scale=scale)
        return _like(out, _new_like_out(q)), lse.contiguous()
    out = _new_like_out(q)
    lse = q.new_empty(B, H, S, dtype=torch.float32)
    for r, lo, hi in _segments(cu_seqlens, S):
        o, l = _FWD(q[r : r + 1, :, lo:hi], k[r : r + 1, :, lo:hi], v[r : r + 1, :, lo:hi], 0.0, causal, scale=scale)
        out[r : r + 1, :, lo:hi] = o
        lse[r : r + 1, :, lo:hi] = l
    return out, lse


@_segment_attention.register_fake
def _(q, k, v, cu_seqlens, causal, scale):
    B, H, S, _ = q.shape
    return _new_like_out(q), q.new_empty(B, H, S, dtype=torch.float32)


@torch.library.custom_op("mmtune::segment_attention_backward", mutates_args=(), device_types="cpu")
def _segment_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                out: torch.Tensor, lse: torch.Tensor, cu_seqlens: torch.Tensor, causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, _, S, _ = q.shape
    if _one_per_row(cu_seqlens, B):
        dq, dk, dv = _BWD(grad_out, q, k, v, out, lse, 0.0, causal, scale=scale)
        return _like(dq, torch.empty_like(q)), _like(dk, torch.empty_like(k)), _like(dv, torch.empty_like(v))
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for r, lo, hi in _segments(cu_seqlens, S):
        seg = lambda t: t[r : r + 1, :, lo:hi]  # noqa: E731
        gq, gk, gv = _BWD(seg(grad_out), seg(q), seg(k), seg(v), seg(out), seg(lse), 0.0, causal, scale=scale)
        seg(dq).copy_(gq)
        seg(dk).copy_(gk)
        seg(dv).copy_(gv)
    return dq, dk, dv


@_segment_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, cu_seqlens, causal, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.causal, ctx.scale = causal, scale


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _segment_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_segment_attention.register_autograd(_backward, setup_context=_setup_context)


def segment_attention_ok(q: torch.Tensor) -> bool:
    """The op runs on the CPU in fp32/bf16/fp16 when torch's flash kernel is enabled: a `sdpa_kernel(MATH)`
    context (the reference numerics) turns it off eagerly; compiled blocks always use it (their fused
    kernels are not the reference numerics anyway, and the switch cannot be read while tracing)."""
    if q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    return torch.compiler.is_compiling() or torch.backends.cuda.flash_sdp_enabled()  # CPU and CUDA flash alike


def segment_attention(q_BHSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor, cu_seqlens: torch.Tensor,
                      causal: bool, scale: float | None = None) -> torch.Tensor:
    """Attention inside each segment of `cu_seqlens` (int32 bounds over the flattened B*S tokens, each
    segment inside one row); `[B, H, S, D]` out."""
    if scale is None:
        scale = q_BHSD.shape[-1] ** -0.5
    return _segment_attention(q_BHSD, k_BGSD, v_BGSD, cu_seqlens, causal, float(scale))[0]
