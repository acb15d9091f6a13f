"""Causal self-attention on the CPU in query chunks, the probabilities kept for the backward.

On batches of rows of a few hundred to a few thousand tokens this is as fast as torch's CPU flash-attention
kernel or faster (1.3x at the bench models' 4 x 512 tokens), forward and backward together; on small problems
flash's lower fixed costs win (docs/PERFORMANCE.md "Attention on the CPU"). How:

- each key/value head's group of query heads is laid out as one matrix whose rows are (position,
  head in group), so one batched matmul per chunk of CHUNK positions covers every head of the group
  against the keys up to the chunk's end. Keys past it are never touched: about half the full score
  matrix is computed, and only the chunk's diagonal block needs the causal mask;
- the softmax runs in place on the scores, which are kept for the backward. Flash keeps only their
  log-sum-exp and recomputes the scores: five matmuls in its backward where this one has four,
  dV += P^T dO, dP = dO V^T, dS = P * (dP - rowsum(dP * P)), dQ = dS K, dK += dS^T Q;
- the softmax scale is folded into the laid-out queries, so dK comes out scaled as well.

The price is memory: the kept probabilities are B*H*S*(S+CHUNK)/2 floats per layer. `fits` allows
at most MAX_SAVED_BYTES and at least MIN_SEQ / MIN_WORK; the rest stays on flash attention
(ops/attention.py chooses).

Forward and backward are custom ops (`mmtune::chunked_causal_attention[_backward]`), so a compiled
block sees each as one opaque kernel, as with ops/segment_attention.py.

Legend: B rows, H query heads, G key/value heads, R = H / G query heads per group, S positions,
D head dim, L keys a chunk sees.
"""

from __future__ import annotations

import torch

CHUNK = 64  # positions per chunk: best or tied at 256-512 tokens of 16/32/64/128 (docs/PERFORMANCE.md)
MAX_SAVED_BYTES = 64 * 2**20  # kept probabilities per call (and layer); past this, flash (which keeps none)
# smaller problems: flash is as fast or faster, its fixed costs being lower (docs/PERFORMANCE.md): rows
# under MIN_SEQ positions, or under MIN_WORK = B*H*S*S*D (the 4 x 512-token, 4-head, D 64 bench is 2**28)
MIN_SEQ = 256
MIN_WORK = 2**26

_SOFTMAX = torch.ops.aten._softmax.out
_SOFTMAX_BACKWARD = torch.ops.aten._softmax_backward_data.out


def _chunks(S: int):
    """(start, end) of each chunk of positions."""
    return [(a, min(a + CHUNK, S)) for a in range(0, S, CHUNK)]


def _probs_numel(B: int, H: int, S: int) -> int:
    """Kept probabilities: each full chunk i holds CHUNK x (i+1)*CHUNK, a last partial one (S % CHUNK) x S,
    per row and head. In closed form, so that a compiled block with a dynamic S does not specialise on it."""
    full, rest = S // CHUNK, S % CHUNK
    return B * H * (CHUNK * CHUNK * full * (full + 1) // 2 + rest * S)


def fits(q_BHSD: torch.Tensor, k_BGSD: torch.Tensor) -> bool:
    """Whether this kernel runs for these inputs: CPU fp32, self-attention (as many keys as queries) over at
    least MIN_SEQ positions and MIN_WORK, grouped key/value heads, the kept probabilities within
    MAX_SAVED_BYTES."""
    B, H, S, D = q_BHSD.shape
    return (q_BHSD.device.type == "cpu" and q_BHSD.dtype == torch.float32 and k_BGSD.shape[2] == S and S >= MIN_SEQ
            and B * H * S * S * D >= MIN_WORK and H % k_BGSD.shape[1] == 0
            and 4 * _probs_numel(B, H, S) <= MAX_SAVED_BYTES)


def _grouped_rows(x_BHSD: torch.Tensor, G: int, scale: float | None = None) -> torch.Tensor:
    """[B, H, S, D] -> [B*G, S*R, D]: each group's query heads as rows (position, head in group), scaled."""
    B, H, S, D = x_BHSD.shape
    src = x_BHSD.unflatten(1, (G, H // G)).permute(0, 1, 3, 2, 4)  # [B, G, S, R, D]
    out = x_BHSD.new_empty(src.shape)
    if scale is None:
        out.copy_(src)
    else:
        torch.mul(src, scale, out=out)
    return out.view(B * G, S * (H // G), D)


def _causal_bias(R: int, like: torch.Tensor) -> torch.Tensor:
    """[CHUNK*R, CHUNK] additive mask of a diagonal block: row (i, r) sees keys <= i."""
    return torch.full((CHUNK, CHUNK), float("-inf"), dtype=like.dtype).triu(1).repeat_interleave(R, dim=0)


def _chunk_probs(probs: torch.Tensor, B: int, G: int, R: int, S: int) -> list[tuple[int, int, torch.Tensor]]:
    """(start, end, the chunk's [B*G, n*R, end] probabilities) of each chunk, viewed in the flat buffer."""
    chunks = _chunks(S)
    pieces = probs.split([B * G * R * (b - a) * b for a, b in chunks])
    return [(a, b, p.view(B * G, (b - a) * R, b)) for (a, b), p in zip(chunks, pieces)]


def _rows_to_heads(dst_GRB: torch.Tensor, a: int, b: int, rows_NrD: torch.Tensor) -> None:
    """Positions a..b of `dst` ([B, G, R, S, D] view) from their (position, head in group) rows [B*G, n*R, D]:
    the inverse of `_grouped_rows` for one chunk."""
    B, G, R, _, D = dst_GRB.shape
    dst_GRB[:, :, :, a:b].copy_(rows_NrD.view(B, G, b - a, R, D).transpose(2, 3))


def _new_out(B: int, H: int, S: int, D: int, like: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] stored as [B, S, H, D]: the caller's transpose + reshape to [B, S, H*D] is then a view."""
    return like.new_empty(B, S, H, D).transpose(1, 2)


@torch.library.custom_op("mmtune::chunked_causal_attention", mutates_args=(), device_types="cpu")
def _attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(output, the kept probabilities, the scaled query rows), the last two for the backward."""
    B, H, S, D = q.shape
    G = k.shape[1]
    R = H // G
    q_NRD = _grouped_rows(q, G, scale)  # N = B*G matrices of S*R rows
    k_NSD, v_NSD = k.reshape(B * G, S, D), v.reshape(B * G, S, D)
    bias = _causal_bias(R, q)
    out_BHSD = _new_out(B, H, S, D, q)
    out_GRB = out_BHSD.unflatten(1, (G, R))  # [B, G, R, S, D] view of the [B, S, H, D] memory
    probs = q.new_empty(_probs_numel(B, H, S))
    for a, b, p_NrL in _chunk_probs(probs, B, G, R, S):  # p: this chunk's scores, then probabilities
        n = b - a
        torch.bmm(q_NRD[:, a * R : b * R], k_NSD[:, :b].transpose(1, 2), out=p_NrL)
        p_NrL[:, :, a:b] += bias[: n * R, :n]
        _SOFTMAX(p_NrL, -1, False, out=p_NrL)
        _rows_to_heads(out_GRB, a, b, torch.bmm(p_NrL, v_NSD[:, :b]))
    return out_BHSD, probs, q_NRD


@_attention.register_fake
def _(q, k, v, scale):
    B, H, S, D = q.shape
    G = k.shape[1]
    return _new_out(B, H, S, D, q), q.new_empty(_probs_numel(B, H, S)), q.new_empty(B * G, S * (H // G), D)


@torch.library.custom_op("mmtune::chunked_causal_attention_backward", mutates_args=(), device_types="cpu")
def _attention_backward(grad_out: torch.Tensor, q_NRD: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        probs: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    B, G, S, D = k.shape
    R = q_NRD.shape[1] // S
    H = G * R
    do_NRD = _grouped_rows(grad_out, G)
    k_NSD, v_NSD = k.reshape(B * G, S, D), v.reshape(B * G, S, D)
    dk_NSD, dv_NSD = k_NSD.new_empty(B * G, S, D), v_NSD.new_empty(B * G, S, D)
    dq_BHSD = _new_out(B, H, S, D, k)
    dq_GRB = dq_BHSD.unflatten(1, (G, R))
    # last chunk first: it sees every key, so its dK, dV products initialise the buffers (no zero fill)
    for a, b, p_NrL in reversed(_chunk_probs(probs, B, G, R, S)):
        n = b - a
        do_NrD, q_NrD = do_NRD[:, a * R : b * R], q_NRD[:, a * R : b * R]
        ds_NrL = torch.bmm(do_NrD, v_NSD[:, :b].transpose(1, 2))  # dP, turned into dS in place below
        if b == S:
            torch.bmm(p_NrL.transpose(1, 2), do_NrD, out=dv_NSD)
        else:
            dv_NSD[:, :b].baddbmm_(p_NrL.transpose(1, 2), do_NrD)
        _SOFTMAX_BACKWARD(ds_NrL, p_NrL, -1, k.dtype, grad_input=ds_NrL)  # row-wise: each row read before written
        dq_NrD = q_NRD.new_empty(B * G, n * R, D)
        torch.baddbmm(dq_NrD, ds_NrL, k_NSD[:, :b], beta=0, alpha=scale, out=dq_NrD)  # dQ = scale dS K
        _rows_to_heads(dq_GRB, a, b, dq_NrD)
        if b == S:  # q was scaled: so is dK
            torch.bmm(ds_NrL.transpose(1, 2), q_NrD, out=dk_NSD)
        else:
            dk_NSD[:, :b].baddbmm_(ds_NrL.transpose(1, 2), q_NrD)
    return dq_BHSD, dk_NSD.view(B, G, S, D), dv_NSD.view(B, G, S, D)


@_attention_backward.register_fake
def _(grad_out, q_NRD, k, v, probs, scale):
    B, G, S, D = k.shape
    return _new_out(B, G * (q_NRD.shape[1] // S), S, D, k), k.new_empty(B, G, S, D), v.new_empty(B, G, S, D)


def _setup_context(ctx, inputs, output):
    _, k, v, scale = inputs
    _, probs, q_NRD = output
    ctx.save_for_backward(q_NRD, k, v, probs)
    ctx.scale = scale
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the two outputs only the backward reads


def _backward(ctx, grad_out, _grad_probs, _grad_q_rows):
    q_NRD, k, v, probs = ctx.saved_tensors
    dq, dk, dv = _attention_backward(grad_out, q_NRD, k, v, probs, ctx.scale)
    return dq, dk, dv, None


_attention.register_autograd(_backward, setup_context=_setup_context)


def chunked_causal_attention(q_BHSD: torch.Tensor, k_BGSD: torch.Tensor, v_BGSD: torch.Tensor,
                             scale: float | None = None) -> torch.Tensor:
    """Causal attention, `[B, H, S, D]` out (stored as [B, S, H, D]); `fits(q, k)` must hold."""
    if scale is None:
        scale = q_BHSD.shape[-1] ** -0.5
    # k and v are kept for the backward: contiguous copies (the [B*G, S, D] batches the products read) rather
    # than views into the q/k/v projection's output, which would keep all of it alive and be copied again
    # in the backward. Under torch.compile the copy fuses into the kernel that makes k (the rotary).
    return _attention(q_BHSD, k_BGSD.contiguous(), v_BGSD.contiguous(), float(scale))[0]
