"""The training loss: lm head + cross-entropy (plain or chunked) with the recipe's five loss types,
and the router's load-balancing (aux) loss.

Legend: B batch rows, S sequence, T = B*S tokens, N valid (labelled) tokens, H hidden, V vocab,
E experts, G grad-accum steps (micro-batches per optimizer step), D data-parallel ranks.

Every loss type is a weighted sum of per-token cross-entropies, contribution = sum_t w_t * ce_t,
with weights chosen so that SUMMING the contributions of every micro-batch of the window on every
rank gives the global loss of the optimizer step (MindSpeed-MM's definitions, see LOSS_TYPES below).
With n_i the valid tokens of sample i, K the samples of the micro-batch, n its valid tokens:

  default          w = 1 / (n * G * D)        mean over the micro-batch's tokens, then over steps and ranks
  per_sample_loss  w = 1 / (n_i * K * G * D)  mean within each sample, then over samples, steps, ranks
                                              (samples = cu_seqlens segments with a label, so packing works)
  per_token_loss   w = 1 / N_global           sum over every valid token of the global batch / their count;
                                              the same whatever the split into micro-batch x G x D
  token_loss       w = 1 / (n_r * R * G * D)  MindSpeed-MM: reduction none, alpha = loss_mask.sum(1) *
                                              loss_mask.shape[0], i.e. per ROW r (R rows with a label)
                                              token sums / (row tokens * rows); unpacked = per_sample_loss.
                                              (Before its loss_cfg refactor, MindSpeed-MM's token_loss was the
                                              micro-batch token sum / DP-mean of its token count; not this.)
  square_loss      w = 1 / (sqrt(n_i) * Wbar_m * G * D), Wbar_m = mean over ranks of sum_i sqrt(n_i) of
                                              micro-step m. InternVL's `loss_reduction: square` (each token of
                                              a sample with n_i tokens weighted 1/sqrt(n_i)) as MindSpeed-MM
                                              computes it (transformers_model.py `calculate_square_loss`:
                                              weights 1/sqrt(n_i), divided by their sum all-reduced with AVG
                                              over data-parallel ranks), then averaged over steps and ranks.

How the trainer combines micro-batches: call `loss_for_backward.backward()` for each micro-batch of
the window (the gradients add up), and let FSDP2 AVERAGE the gradients over the D data-parallel
ranks (its default reduce-scatter). `loss_for_backward` is contribution * D, so the result is the
gradient of the global loss. The value logged is the sum of `loss_value` over the window and over the
ranks (the trainer's one all-reduce SUM per step; identical for every split with per_token_loss).

Context parallelism (cp ranks share one micro-batch, each holding S/cp tokens of every row): the weights
above are computed on the WHOLE micro-batch (every cp rank has its labels) and cut to the rank's tokens,
so each rank's contribution is its tokens' part of the micro-batch's loss and the cp contributions add up
to it. FSDP averages over all D * cp ranks, so `loss_for_backward` is contribution * D * cp; the window's
counts are summed over the dp ranks only (`for_window(group=the dp group)`).

The router aux loss (coef * Switch load-balancing loss over the MoE layers' router logits, as
transformers' `load_balancing_loss_func`) is computed per micro-batch and added as coef * aux / (G * D)
for every loss type: summed over the window and the ranks it is coef * (mean aux of the step), i.e.
added ONCE per optimizer step, whatever G and D. Under context parallelism its per-expert sums run over
the tokens of the whole cp group (the same aux on every cp rank), and each cp rank adds 1/cp of it.

Chunked mode (`compute_mode: chunk`): `chunked_linear_cross_entropy` never holds the [N x V] logits;
it computes each chunk's loss and its gradients (w.r.t. hidden and lm-head weight) in forward, one
chunk of `chunk_size` tokens at a time, and backward only scales them in place and hands them over
(3 matmuls per chunk, like the plain path; so its backward runs once: no retain_graph through it).
Peak extra memory, for C = chunk_size and a weight in dtype d (bf16 or fp32): one fp32 [C x V] buffer
(logits -> probabilities -> their gradient, in place) and its [C x V] copy in d when d is narrower, the
fp32 [V x H] weight-gradient accumulator, and at the very end that gradient cast to d; plus the [N x H]
hidden gradient in d. No [V x H] temporary per chunk: the weight gradient accumulates in place, in fp32
(`addmm` with bf16 operands into the fp32 buffer where the device has it — CUDA's out_dtype — else fp32
operands, i.e. a [C x H] fp32 copy of the chunk's hidden states). Both paths first drop tokens without a
label, so prompt and image tokens cost nothing. Sources of the definitions:
MindSpeed-MM mindspeed_mm/models/transformers_model.py and models/common/chunkloss.py (fixed_cross_entropy
alphas), its PR !1990 table; InternVL / xtuner `len2weight` for square.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from mmtune.distributed.context_parallel import ContextParallel, all_reduce_sum
from mmtune.train.recipe_files import LOSS_TYPES  # the one list (model.json loss_cfg.loss_type)

IGNORE_INDEX = -100


# --------------------------------------------------------------------------- samples and the window


def sample_index(labels_BS: Tensor, cu_seqlens: Tensor | None) -> Tensor:
    """Segment index of each flattened token [T]: the cu_seqlens segment, or the row when None."""
    B, S = labels_BS.shape
    tok_T = torch.arange(B * S, device=labels_BS.device)
    if cu_seqlens is None:
        return tok_T // S
    bounds = cu_seqlens.to(device=labels_BS.device, dtype=torch.long)
    if bounds[0].item() != 0 or bounds[-1].item() != B * S:
        raise ValueError(f"cu_seqlens must run from 0 to B*S={B * S}, got {bounds[0].item()}..{bounds[-1].item()}")
    return torch.searchsorted(bounds[1:], tok_T, right=True)


def _counts(valid_T: Tensor, seg_T: Tensor) -> Tensor:
    """Valid tokens per segment [K_all] (float)."""
    return torch.zeros(int(seg_T.max().item()) + 1, dtype=torch.float64, device=valid_T.device).index_add_(
        0, seg_T, valid_T.double())


def micro_batch_stats(labels_BS: Tensor, cu_seqlens: Tensor | None = None) -> tuple[float, float]:
    """(valid tokens, sum over samples of sqrt(valid tokens)) of one micro-batch."""
    valid_T = labels_BS.reshape(-1) != IGNORE_INDEX
    n_K = _counts(valid_T, sample_index(labels_BS, cu_seqlens))
    return float(n_K.sum()), float(n_K.sqrt().sum())


@dataclass(frozen=True)
class LossContext:
    """What a micro-batch's loss needs to know about its optimizer step (the grad-accum window)."""

    loss_type: str = "default"
    grad_accum_steps: int = 1  # G
    dp_size: int = 1  # D
    global_valid_tokens: float | None = None  # per_token_loss: valid tokens of the whole global batch
    square_norms: tuple[float, ...] | None = None  # square_loss: per micro-step, mean over ranks of sum_i sqrt(n_i)

    def __post_init__(self):
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r} is not one of {LOSS_TYPES}")

    @staticmethod
    def local_window_stats(window: Sequence[tuple[Tensor, Tensor | None]]) -> Tensor:
        """float64 [1 + G]: this rank's valid tokens over the window, then each micro-batch's sum_i sqrt(n_i).
        `window` holds (labels [B, S], cu_seqlens or None) of the G micro-batches, in order."""
        stats = [micro_batch_stats(labels, cu) for labels, cu in window]
        return torch.tensor([sum(n for n, _ in stats)] + [w for _, w in stats], dtype=torch.float64)

    @classmethod
    def from_stats(cls, loss_type: str, summed_stats: Tensor, dp_size: int) -> "LossContext":
        """From `local_window_stats` summed over the data-parallel ranks."""
        s = summed_stats.tolist()
        return cls(loss_type, grad_accum_steps=len(s) - 1, dp_size=dp_size, global_valid_tokens=s[0],
                   square_norms=tuple(w / dp_size for w in s[1:]))

    @classmethod
    def for_window(cls, loss_type: str, window: Sequence[tuple[Tensor, Tensor | None]],
                   group: dist.ProcessGroup | None = None) -> "LossContext":
        """The context of one optimizer step, from the prefetched window of G micro-batches; all-reduces the
        counts over the data-parallel group when torch.distributed is initialised (every rank must call it)."""
        stats = cls.local_window_stats(window)
        dp = 1
        if dist.is_available() and dist.is_initialized():
            dp = dist.get_world_size(group)
            if dp > 1:
                device = "cuda" if dist.get_backend(group) == "nccl" else "cpu"
                t = stats.to(device)
                dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
                stats = t.cpu()
        return cls.from_stats(loss_type, stats, dp)


def token_weights(labels_BS: Tensor, ctx: LossContext, cu_seqlens: Tensor | None = None, micro_step: int = 0) -> Tensor:
    """w_T (float64, zero where unlabelled): this micro-batch's contribution is sum_t w_t * ce_t."""
    valid_T = (labels_BS.reshape(-1) != IGNORE_INDEX).double()
    G, D = ctx.grad_accum_steps, ctx.dp_size
    kind = ctx.loss_type
    if kind == "per_token_loss":
        if ctx.global_valid_tokens is None:
            raise ValueError("per_token_loss needs the window's global token count (LossContext.for_window)")
        return valid_T / max(ctx.global_valid_tokens, 1.0)
    if kind == "default":
        return valid_T / (valid_T.sum().clamp(min=1.0) * G * D)
    seg_T = sample_index(labels_BS, None if kind == "token_loss" else cu_seqlens)
    n_K = _counts(valid_T, seg_T)
    n_T = n_K[seg_T].clamp(min=1.0)
    if kind in ("per_sample_loss", "token_loss"):
        samples = (n_K > 0).sum().clamp(min=1)
        return valid_T / (n_T * samples * G * D)
    assert kind == "square_loss"
    if ctx.square_norms is None:
        raise ValueError("square_loss needs the window's per-step weight sums (LossContext.for_window)")
    norm = max(ctx.square_norms[micro_step], 1e-12)
    return valid_T / (n_T.sqrt() * norm * G * D)


# --------------------------------------------------------------------------- lm head + cross-entropy


@functools.cache
def _fp32_out_addmm(device: torch.device) -> bool:
    """Whether `torch.addmm(acc_fp32, a_bf16, b_bf16, out_dtype=torch.float32, out=acc_fp32)` works on this
    device (CUDA: the GEMM accumulates in fp32 and adds into the fp32 buffer; the CPU has no such kernel)."""
    if device.type != "cuda":
        return False
    a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    acc = torch.ones(2, 2, dtype=torch.float32, device=device)
    try:
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool((acc == 3).all())


def _accumulate_grad_w(grad_w_VH: Tensor, g_CV: Tensor, g_low_CV: Tensor | None, h_CH: Tensor) -> None:
    """grad_w += g^T @ h in place, in grad_w's dtype (fp32). g_CV is the fp32 logit gradient, g_low_CV the
    same in h's (narrower) dtype or None when h is fp32 already. No [V, H] temporary."""
    if g_low_CV is None:
        grad_w_VH.addmm_(g_CV.t(), h_CH)
    elif _fp32_out_addmm(h_CH.device):
        torch.addmm(grad_w_VH, g_low_CV.t(), h_CH, out_dtype=grad_w_VH.dtype, out=grad_w_VH)
    else:
        grad_w_VH.addmm_(g_CV.t(), h_CH.to(grad_w_VH.dtype))


class _ChunkedLinearCE(torch.autograd.Function):
    """sum_t w_t * CE(h_t @ W^T, y_t) computed chunk by chunk; gradients computed in forward."""

    @staticmethod
    def forward(ctx, hidden_NH: Tensor, weight_VH: Tensor, labels_N: Tensor, w_N: Tensor, chunk_size: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(hidden_NH.dtype, torch.float32)  # logits, loss and grad_w accumulate in fp32+
        total = torch.zeros((), dtype=acc, device=hidden_NH.device)
        grad_h = torch.empty_like(hidden_NH) if need_h else None
        grad_w = torch.zeros(weight_VH.shape, dtype=acc, device=weight_VH.device) if need_w else None
        for start in range(0, hidden_NH.shape[0], chunk_size):
            end = min(start + chunk_size, hidden_NH.shape[0])
            h_CH, y_C, w_C = hidden_NH[start:end], labels_N[start:end], w_N[start:end]
            # one [C, V] buffer per chunk: logits -> exp(logits - max) -> d loss / d logits, all in place
            buf_CV = (h_CH @ weight_VH.t()).to(acc)
            target_C = buf_CV.gather(1, y_C[:, None]).squeeze(1)
            max_C = buf_CV.amax(dim=-1)
            sum_C = buf_CV.sub_(max_C[:, None]).exp_().sum(dim=-1)
            total += (w_C * (sum_C.log() + max_C - target_C)).sum()
            if need_h or need_w:
                # d(sum w*ce)/d logits = w * (softmax - onehot)
                g_CV = buf_CV.mul_((w_C / sum_C)[:, None])
                g_CV[torch.arange(end - start, device=g_CV.device), y_C] -= w_C
                g_low_CV = g_CV.to(hidden_NH.dtype) if hidden_NH.dtype != acc else None
                if need_h:
                    torch.matmul(g_CV if g_low_CV is None else g_low_CV, weight_VH, out=grad_h[start:end])
                if need_w:
                    _accumulate_grad_w(grad_w, g_CV, g_low_CV, h_CH)
                del g_CV, g_low_CV
            del buf_CV  # free this chunk's buffers before the next chunk allocates its own
        # kept on ctx (not save_for_backward) so backward can hand them over without a copy
        ctx.grads = (grad_h, grad_w)
        ctx.weight_dtype = weight_VH.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        if ctx.grads is None:
            raise RuntimeError("chunked cross-entropy computes its gradients in forward and hands them over in its "
                               "one backward; do not backward through it twice (retain_graph)")
        grad_h, grad_w = ctx.grads
        ctx.grads = None  # scaled in place and returned: the fp32 weight grad is only cast (once) to the weight dtype
        gh = grad_h.mul_(grad_out.to(grad_h.dtype)) if grad_h is not None else None
        gw = None
        if grad_w is not None:
            gw = grad_w.mul_(grad_out).to(ctx.weight_dtype)
            del grad_w  # the fp32 accumulator goes as soon as the cast exists
        return gh, gw, None, None, None


def chunked_linear_cross_entropy(hidden_NH: Tensor, weight_VH: Tensor, labels_N: Tensor, w_N: Tensor,
                                 chunk_size: int = 1024) -> Tensor:
    """sum_t w_t * CE(hidden_t @ weight^T, label_t) without ever holding more than chunk_size x V logits
    (forward and backward). Labels must all be valid (drop ignored tokens first)."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return _ChunkedLinearCE.apply(hidden_NH, weight_VH, labels_N, w_N, chunk_size)


def linear_cross_entropy(hidden_NH: Tensor, weight_VH: Tensor, labels_N: Tensor, w_N: Tensor) -> Tensor:
    """The plain path: full [N x V] logits (float32), per-token CE, weighted sum."""
    logits_NV = (hidden_NH @ weight_VH.t()).to(torch.promote_types(hidden_NH.dtype, torch.float32))
    return (F.cross_entropy(logits_NV, labels_N, reduction="none") * w_N).sum()


# --------------------------------------------------------------------------- router aux loss


def router_aux_loss(router_logits: Sequence[Tensor], num_experts: int, top_k: int,
                    token_mask: Tensor | None = None, group: dist.ProcessGroup | None = None) -> Tensor:
    """Switch-Transformer load-balancing loss over all MoE layers (transformers' load_balancing_loss_func):
    E * sum_e f_e * P_e, with f_e = top-k assignments to expert e per token and P_e = mean softmax
    probability of e, both over all layers' tokens (token_mask [T] or [B, S]: 1 = count the token).
    group: a context-parallel group whose ranks hold the other tokens of the sequence: the sums run over
    all of them (differentiably), so every rank gets the loss of the whole sequence."""
    if not router_logits:
        raise ValueError("router_aux_loss needs the MoE layers' router logits (model output router_logits)")
    device = router_logits[0].device
    mask_T = None if token_mask is None else token_mask.reshape(-1).to(device=device, dtype=torch.float32)
    assigned_E = torch.zeros(num_experts, device=device)
    prob_E = torch.zeros(num_experts, device=device)
    rows = torch.zeros((), device=device)
    for logits_TE in router_logits:
        probs_TE = torch.softmax(logits_TE.float(), dim=-1)
        chosen_TK = probs_TE.topk(top_k, dim=-1).indices
        m_T = torch.ones(probs_TE.shape[0], device=device) if mask_T is None else mask_T
        assigned_E = assigned_E.index_add(0, chosen_TK.reshape(-1), m_T.repeat_interleave(top_k))
        prob_E = prob_E + (probs_TE * m_T[:, None]).sum(0)
        rows = rows + m_T.sum()
    if group is not None:
        counts = torch.cat([assigned_E, rows[None]])
        dist.all_reduce(counts, group=group)  # counts carry no gradient
        assigned_E, rows = counts[:-1], counts[-1]
        prob_E = all_reduce_sum(prob_E, group)
    rows = rows.clamp(min=1.0)
    return num_experts * ((assigned_E / rows) * (prob_E / rows)).sum()


# --------------------------------------------------------------------------- the trainer's entry point


@dataclass
class LossOutput:
    loss_for_backward: Tensor  # scalar; .backward() it for each micro-batch (see module docstring)
    loss_value: Tensor  # detached: this micro-batch's contribution to the global lm loss
    aux_value: Tensor  # detached: its contribution to the global aux loss (coef included; 0 when off)
    num_tokens: int  # valid (labelled) tokens in this micro-batch


def lm_loss(hidden_BSH: Tensor, lm_head_weight_VH: Tensor, labels_BS: Tensor, ctx: LossContext, *,
            cu_seqlens: Tensor | None = None, micro_step: int = 0, compute_mode: str = "default",
            chunk_size: int = 1024, router_logits: Sequence[Tensor] | None = None, router_aux_loss_coef: float = 0.0,
            num_experts: int | None = None, top_k: int | None = None, token_mask: Tensor | None = None,
            cp: ContextParallel | None = None) -> LossOutput:
    """One micro-batch's loss. labels_BS are ALREADY SHIFTED (-100 = no target); micro_step is the index
    of this micro-batch in the window (square_loss). lm_head_weight_VH must be a plain (unsharded) tensor.

    cp (context parallelism): hidden_BSH and router_logits hold this rank's S/cp tokens of each row, while
    labels_BS, cu_seqlens and token_mask describe the whole micro-batch. The token weights are computed on
    the whole micro-batch, so every loss type normalises over the whole sequence, then cut to the rank's
    tokens; the aux loss sums over the group."""
    if compute_mode not in ("default", "chunk"):
        raise ValueError(f"compute_mode {compute_mode!r} is not 'default' or 'chunk'")
    w_T = token_weights(labels_BS, ctx, cu_seqlens, micro_step)
    ranks = ctx.dp_size  # FSDP averages the gradients over them; loss_for_backward undoes it
    if cp is not None:
        B, S = labels_BS.shape
        w_T = cp.local(w_T.view(B, S), 1).reshape(-1)
        labels_BS = cp.local(labels_BS, 1)
        token_mask = cp.local(token_mask, 1) if token_mask is not None else None
        ranks *= cp.size
    if labels_BS.shape != hidden_BSH.shape[:2]:
        raise ValueError(f"labels {tuple(labels_BS.shape)} do not match hidden states {tuple(hidden_BSH.shape)}")
    labels_T = labels_BS.reshape(-1)
    keep_N = (labels_T != IGNORE_INDEX).nonzero().squeeze(1)
    hidden_NH = hidden_BSH.reshape(-1, hidden_BSH.shape[-1]).index_select(0, keep_N)
    acc = torch.promote_types(hidden_NH.dtype, torch.float32)
    args = (hidden_NH, lm_head_weight_VH, labels_T[keep_N], w_T[keep_N].to(device=hidden_NH.device, dtype=acc))
    if compute_mode == "chunk":
        loss = chunked_linear_cross_entropy(*args, chunk_size=chunk_size)
    else:
        loss = linear_cross_entropy(*args)
    aux = torch.zeros((), device=loss.device)
    if router_aux_loss_coef > 0:
        if num_experts is None or top_k is None:
            raise ValueError("router_aux_loss_coef > 0 needs num_experts and top_k")
        aux_mb = router_aux_loss(router_logits or (), num_experts, top_k, token_mask,
                                 group=cp.group if cp is not None else None)
        # every rank of a cp group holds the same aux_mb (of the whole sequence): each adds 1/cp of it
        aux = router_aux_loss_coef * aux_mb.to(loss.device) / (ctx.grad_accum_steps * ranks)
    return LossOutput(loss_for_backward=(loss + aux) * ranks, loss_value=loss.detach(),
                      aux_value=aux.detach(), num_tokens=int(keep_N.numel()))
