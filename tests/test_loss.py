"""The training loss: chunked == plain, the five loss types as defined, split invariance of per_token_loss,
the router aux loss against transformers."""

from __future__ import annotations

import math
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from mmtune.train.loss import (
    IGNORE_INDEX,
    LossContext,
    chunked_linear_cross_entropy,
    linear_cross_entropy,
    lm_loss,
    router_aux_loss,
    token_weights,
)

V, H, VOCAB_IN = 37, 8, 23


def _grads(out, params):
    return torch.autograd.grad(out, params, allow_unused=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("chunk", [1, 5, 64])
def test_chunked_equals_plain(dtype, chunk):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 24, H, dtype=dtype, generator=g, requires_grad=True)
    w = torch.randn(V, H, dtype=dtype, generator=g, requires_grad=True)
    y = torch.randint(0, V, (2, 24), generator=g)
    y[0, :7] = IGNORE_INDEX
    y[1, -3:] = IGNORE_INDEX
    ctx = LossContext("per_sample_loss")
    plain = lm_loss(h, w, y, ctx)
    chunked = lm_loss(h, w, y, ctx, compute_mode="chunk", chunk_size=chunk)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.loss_value, plain.loss_value, **tol)
    for a, b in zip(_grads(chunked.loss_for_backward, (h, w)), _grads(plain.loss_for_backward, (h, w))):
        torch.testing.assert_close(a, b, **tol)
    # and both are the textbook loss: mean over each row's valid tokens, then over rows
    ce = F.cross_entropy((h @ w.t()).reshape(-1, V), y.reshape(-1), reduction="none").reshape(2, 24)
    ref = sum(ce[r][y[r] != IGNORE_INDEX].mean() for r in range(2)) / 2
    torch.testing.assert_close(plain.loss_value, ref.detach(), **tol)


def test_chunked_grads_and_frozen_head():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(11, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(9, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 9, (11,), generator=g)
    wt = torch.rand(11, dtype=torch.float64, generator=g)
    # gradients vs autograd through the plain path, scaled by an upstream factor (float64, tight)
    ga = _grads(2.5 * chunked_linear_cross_entropy(h, w, y, wt, 4), (h, w))
    gb = _grads(2.5 * linear_cross_entropy(h, w, y, wt), (h, w))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    out = chunked_linear_cross_entropy(h, w, y, wt, 4)
    out.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="do not backward through it twice"):
        out.backward()
    frozen = w.detach()  # frozen lm head: only the hidden states get a gradient
    (gh,) = _grads(chunked_linear_cross_entropy(h, frozen, y, wt, 3), (h,))
    (gh_ref,) = _grads(linear_cross_entropy(h, frozen, y, wt), (h,))
    torch.testing.assert_close(gh, gh_ref)
    with torch.no_grad():  # evaluation: value only
        torch.testing.assert_close(chunked_linear_cross_entropy(h, w, y, wt, 3), linear_cross_entropy(h, w, y, wt))


def test_chunked_bf16_close_to_fp32():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(40, 16, generator=g)
    w = torch.randn(50, 16, generator=g) * 0.3
    y = torch.randint(0, 50, (40,), generator=g)
    wt = torch.full((40,), 1 / 40)
    hb, wb = h.bfloat16().requires_grad_(), w.bfloat16().requires_grad_()
    out = chunked_linear_cross_entropy(hb, wb, y, wt, 16)
    assert out.dtype == torch.float32
    gh, gw = _grads(out, (hb, wb))
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    ref = linear_cross_entropy(h, w, y, wt)
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_chunked_bf16_has_no_weight_sized_temporaries():
    """bf16 chunked CE over 6 chunks: only two [V, H]-sized storages are ever allocated — the fp32 weight-
    gradient accumulator and, in backward, its one cast to bf16 (a per-chunk `g.T @ h` would add one per
    chunk) — and that gradient is the fp32-accumulated one, rounded once."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    Vb, Hb, N, C = 300, 24, 60, 10
    g = torch.Generator().manual_seed(6)
    h = (torch.randn(N, Hb, generator=g) * 0.5).bfloat16().requires_grad_()
    w = (torch.randn(Vb, Hb, generator=g) * 0.3).bfloat16().requires_grad_()
    y = torch.randint(0, Vb, (N,), generator=g)
    wt = torch.full((N,), 1 / N)
    big: dict[int, tuple] = {}
    inputs = {h.untyped_storage().data_ptr(), w.untyped_storage().data_ptr()}

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_flatten(out)[0]:
                if (isinstance(t, torch.Tensor) and t.untyped_storage().nbytes() >= Vb * Hb * 2
                        and t.untyped_storage().data_ptr() not in inputs):
                    big.setdefault(t.untyped_storage().data_ptr(), (str(func), t.dtype, t.untyped_storage()))
            return out

    with Record():
        out = chunked_linear_cross_entropy(h, w, y, wt, C)
        gh, gw = _grads(out, (h, w))
    assert sorted(str(d) for _, d, _ in big.values()) == ["torch.bfloat16", "torch.float32"], [(f, d, s.nbytes()) for f, d, s in big.values()]
    # reference: the same per-token gradients, accumulated over all tokens in float64, rounded to bf16 once
    logits = h.double() @ w.double().t()
    g_NV = (torch.softmax(logits, -1) - F.one_hot(y, Vb).double()) * wt.double()[:, None]
    ref = (g_NV.t() @ h.double()).bfloat16()
    assert gw.dtype == torch.bfloat16
    assert (gw.double() - ref.double()).abs().max() <= 2 ** -7 * ref.double().abs().max()


def test_cuda_weight_grad_accumulation_dry_run(monkeypatch):
    """The CUDA branch (bf16 operands, fp32 out, in place) on meta tensors: the call exists in this torch and
    writes into the fp32 accumulator itself (a CPU has no such kernel; bench/gpu_train.py runs it on a GPU)."""
    import mmtune.train.loss as L

    assert L._fp32_out_addmm(torch.device("cpu")) is False
    monkeypatch.setattr(L, "_fp32_out_addmm", lambda device: True)
    acc = torch.empty(7, 5, device="meta")
    g = torch.empty(3, 7, device="meta")
    L._accumulate_grad_w(acc, g, g.bfloat16(), torch.empty(3, 5, device="meta", dtype=torch.bfloat16))
    calls = []

    def spy(*a, **k):
        calls.append(k)
        return k["out"]

    monkeypatch.setattr(L.torch, "addmm", spy)
    L._accumulate_grad_w(acc, g, g.bfloat16(), torch.empty(3, 5, device="meta", dtype=torch.bfloat16))
    assert calls[0]["out"] is acc and calls[0]["out_dtype"] == torch.float32


# --------------------------------------------------------------------------- loss types over a window


def _samples(seed=0, lengths=(5, 9, 3, 12), prompt=(2, 3, 1, 4)):
    """Four samples: token ids [L], shifted labels [L] (prompt masked, last token -100)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n, p in zip(lengths, prompt):
        ids = torch.randint(0, VOCAB_IN, (n,), generator=g)
        labels = torch.randint(0, V, (n,), generator=g)
        labels[:p] = IGNORE_INDEX
        labels[-1] = IGNORE_INDEX
        out.append((ids, labels))
    return out


def _pad_batch(samples):
    """One sample per row, right-padded; cu_seqlens: each sample and each pad run a segment."""
    S = max(len(i) for i, _ in samples)
    ids = torch.zeros(len(samples), S, dtype=torch.long)
    labels = torch.full((len(samples), S), IGNORE_INDEX)
    bounds = [0]
    for r, (i, y) in enumerate(samples):
        ids[r, : len(i)], labels[r, : len(y)] = i, y
        bounds.append(r * S + len(i))
        if len(i) < S:
            bounds.append((r + 1) * S)
    return ids, labels, torch.tensor(bounds, dtype=torch.int32)


class Toy(torch.nn.Module):
    """hidden = tanh(embedding) — enough for gradients to flow to shared parameters."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(VOCAB_IN, H, generator=g, dtype=torch.float64))
        self.head = torch.nn.Parameter(torch.randn(V, H, generator=g, dtype=torch.float64) * 0.5)

    def forward(self, ids):
        return torch.tanh(self.emb[ids])


def _run_split(loss_type, ranks, compute_mode="default"):
    """ranks: list (one per DP rank) of windows (list of micro-batches = lists of samples).
    Returns (global loss, grads averaged over ranks as FSDP does)."""
    model = Toy()
    batches = [[_pad_batch(mb) for mb in window] for window in ranks]
    stats = sum(LossContext.local_window_stats([(y, cu) for _, y, cu in w]) for w in batches)  # all-reduce SUM
    ctx = LossContext.from_stats(loss_type, stats, dp_size=len(ranks))
    total, grads = 0.0, None
    for window in batches:
        model.zero_grad()
        for m, (ids, y, cu) in enumerate(window):
            out = lm_loss(model(ids), model.head, y, ctx, cu_seqlens=cu, micro_step=m, compute_mode=compute_mode,
                          chunk_size=4)
            out.loss_for_backward.backward()
            total += float(out.loss_value)
        rank_grads = [p.grad.clone() for p in model.parameters()]
        grads = rank_grads if grads is None else [a + b for a, b in zip(grads, rank_grads)]
    return total, [g / len(ranks) for g in grads]


@pytest.mark.parametrize("compute_mode", ["default", "chunk"])
def test_per_token_loss_is_split_invariant(compute_mode):
    s = _samples()
    splits = {
        "1x4 (G=1)": [[s]],
        "4x1 (G=4)": [[[s[0]], [s[1]], [s[2]], [s[3]]]],
        "2 ranks x 2": [[[s[0]], [s[1]]], [[s[2]], [s[3]]]],
        "2 ranks x mbs 2": [[[s[3], s[0]]], [[s[1], s[2]]]],
    }
    results = {name: _run_split("per_token_loss", ranks, compute_mode) for name, ranks in splits.items()}
    # the definition: sum over every valid token of the global batch / their count
    model = Toy()
    ce = torch.cat([F.cross_entropy(model(i)[y != IGNORE_INDEX] @ model.head.t(), y[y != IGNORE_INDEX],
                                    reduction="none") for i, y in s])
    ref_loss = ce.mean()
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    for name, (loss, grads) in results.items():
        assert math.isclose(loss, ref_loss.item(), rel_tol=1e-9), name
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-10, msg=name)


def _mean_ce(model, samples):
    return [F.cross_entropy(model(i)[y != IGNORE_INDEX] @ model.head.t(), y[y != IGNORE_INDEX]) for i, y in samples]


def test_default_loss_is_mean_of_micro_batch_means():
    s = _samples()
    loss, grads = _run_split("default", [[[s[0], s[1]], [s[2]]], [[s[3]], [s[1]]]])
    model = Toy()

    def mb_mean(samples):
        ys = torch.cat([y for _, y in samples])
        ce = torch.cat([F.cross_entropy(model(i) @ model.head.t(), y, reduction="none") for i, y in samples])
        return ce[ys != IGNORE_INDEX].mean()

    ref = (mb_mean([s[0], s[1]]) + mb_mean([s[2]]) + mb_mean([s[3]]) + mb_mean([s[1]])) / 4
    assert math.isclose(loss, ref.item(), rel_tol=1e-9)
    for a, b in zip(grads, torch.autograd.grad(ref, list(model.parameters()))):
        torch.testing.assert_close(a, b)


def _packed(samples, pad_to):
    """All samples packed into ONE row (+ a pad run), cu_seqlens marking each."""
    ids = torch.cat([i for i, _ in samples])
    labels = torch.cat([y for _, y in samples])
    bounds = [0]
    for i, _ in samples:
        bounds.append(bounds[-1] + len(i))
    pad = pad_to - len(ids)
    if pad:
        ids = torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
        labels = torch.cat([labels, torch.full((pad,), IGNORE_INDEX)])
        bounds.append(pad_to)
    return ids[None], labels[None], torch.tensor(bounds, dtype=torch.int32)


@pytest.mark.parametrize("compute_mode", ["default", "chunk"])
def test_per_sample_loss_unpacked_and_packed(compute_mode):
    s = _samples()
    model = Toy()
    ref = torch.stack(_mean_ce(model, s)).mean()  # mean within each sample, then over samples
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    ctx = LossContext("per_sample_loss")
    for ids, y, cu in (_pad_batch(s), _packed(s, pad_to=40)):
        model.zero_grad()
        out = lm_loss(model(ids), model.head, y, ctx, cu_seqlens=cu, compute_mode=compute_mode, chunk_size=3)
        out.loss_for_backward.backward()
        assert math.isclose(float(out.loss_value), ref.item(), rel_tol=1e-9)
        for p, b in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, b)
    # over steps and ranks: the mean of the micro-batches' sample means
    loss, _ = _run_split("per_sample_loss", [[[s[0], s[1]], [s[2]]], [[s[3]], [s[1]]]])
    m = _mean_ce(model, s)
    want = ((m[0] + m[1]) / 2 + m[2] + m[3] + m[1]) / 4
    assert math.isclose(loss, want.item(), rel_tol=1e-9)


def test_token_loss_is_per_row():
    """MindSpeed-MM token_loss: alpha = loss_mask.sum(1) * rows -> per-row means averaged over rows (a packed
    row counts once, unlike per_sample_loss)."""
    s = _samples()
    model = Toy()
    ids, y, cu = _packed(s[:3], pad_to=20)
    ids2, y2, _ = _pad_batch([s[3]])
    ids = torch.cat([ids, F.pad(ids2, (0, 20 - ids2.shape[1]))])
    y = torch.cat([y, F.pad(y2, (0, 20 - y2.shape[1]), value=IGNORE_INDEX)])
    out = lm_loss(model(ids), model.head, y, LossContext("token_loss"), cu_seqlens=None)
    ce = F.cross_entropy((model(ids) @ model.head.t()).reshape(-1, V), y.reshape(-1), reduction="none").reshape(2, 20)
    want = sum(ce[r][y[r] != IGNORE_INDEX].mean() for r in range(2)) / 2
    assert math.isclose(float(out.loss_value), want.item(), rel_tol=1e-9)


def test_square_loss_matches_mindspeed_formula():
    """Per micro-batch (MindSpeed-MM calculate_square_loss): sum_i sum_t l_it/sqrt(n_i) divided by the DP-average of
    sum_i sqrt(n_i); then averaged over grad-accum steps and DP ranks."""
    s = _samples()
    ranks = [[[s[0], s[1]], [s[2]]], [[s[3]], [s[1], s[2]]]]
    loss, _ = _run_split("square_loss", ranks)
    model = Toy()

    def parts(samples):
        num = sum(F.cross_entropy(model(i)[y != IGNORE_INDEX] @ model.head.t(), y[y != IGNORE_INDEX],
                                  reduction="sum") / math.sqrt(int((y != IGNORE_INDEX).sum())) for i, y in samples)
        den = sum(math.sqrt(int((y != IGNORE_INDEX).sum())) for _, y in samples)
        return num, den

    want = 0.0
    for m in range(2):
        (n0, d0), (n1, d1) = parts(ranks[0][m]), parts(ranks[1][m])
        want += (n0 / ((d0 + d1) / 2) + n1 / ((d0 + d1) / 2)).item() / 4
    assert math.isclose(loss, want, rel_tol=1e-9)


def test_context_errors_and_empty_micro_batch():
    y = torch.full((1, 6), IGNORE_INDEX)
    assert token_weights(y, LossContext("default")).abs().sum() == 0  # no valid label: contributes 0, no NaN
    with pytest.raises(ValueError, match="per_token_loss needs"):
        token_weights(torch.zeros(1, 3, dtype=torch.long), LossContext("per_token_loss"))
    with pytest.raises(ValueError, match="loss_type 'mean'"):
        LossContext("mean")
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to B\\*S=6"):
        token_weights(torch.zeros(1, 6, dtype=torch.long), LossContext("per_sample_loss"), torch.tensor([0, 4]))


# --------------------------------------------------------------------------- router aux loss


def test_router_aux_loss_matches_transformers():
    from transformers.models.glm4v_moe.modeling_glm4v_moe import load_balancing_loss_func

    g = torch.Generator().manual_seed(4)
    E, K, B, S = 8, 2, 2, 6
    logits = tuple(torch.randn(B * S, E, generator=g, requires_grad=True) for _ in range(3))
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, 4:] = 0
    for m in (None, mask):
        ours = router_aux_loss(logits, E, K, m)
        ref = load_balancing_loss_func(logits, E, K, m)
        torch.testing.assert_close(ours, ref)
        for a, b in zip(torch.autograd.grad(ours, logits), torch.autograd.grad(ref, logits)):
            torch.testing.assert_close(a, b)


def test_aux_loss_added_once_per_step():
    g = torch.Generator().manual_seed(5)
    E, K = 4, 2
    coef = 0.01
    s = _samples()
    model = Toy()
    window = [_pad_batch([s[0], s[1]]), _pad_batch([s[2]]), _pad_batch([s[3]])]
    ctx = LossContext.from_stats("per_token_loss", LossContext.local_window_stats([(y, c) for _, y, c in window]), 1)
    aux_sum, mb_aux = 0.0, []
    for m, (ids, y, cu) in enumerate(window):
        rl = (torch.randn(y.numel(), E, generator=g),)
        out = lm_loss(model(ids), model.head, y, ctx, cu_seqlens=cu, micro_step=m, router_logits=rl,
                      router_aux_loss_coef=coef, num_experts=E, top_k=K)
        aux_sum += float(out.aux_value)
        mb_aux.append(float(router_aux_loss(rl, E, K)))
        plain = lm_loss(model(ids), model.head, y, ctx, cu_seqlens=cu, micro_step=m)
        torch.testing.assert_close(out.loss_for_backward - plain.loss_for_backward, out.aux_value.double())
    assert math.isclose(aux_sum, coef * sum(mb_aux) / len(mb_aux), rel_tol=1e-6)


# --------------------------------------------------------------------------- 2 gloo ranks


def test_for_window_on_two_ranks(tmp_path):
    """LossContext.for_window all-reduces the window's counts; per_token_loss on 2 gloo ranks (grads averaged as
    FSDP does) equals the single-process loss over the same 4 samples. Two plain processes (no launcher)."""
    import os
    import subprocess
    from pathlib import Path

    from dist_utils import free_port

    script = tmp_path / "rank.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import test_loss as T
        from mmtune.train.loss import LossContext, lm_loss
        dist.init_process_group("gloo")
        rank = dist.get_rank()
        s = T._samples()
        window = [T._pad_batch([s[rank]]), T._pad_batch([s[rank + 2]])]
        ctx = LossContext.for_window("per_token_loss", [(y, cu) for _, y, cu in window])
        assert ctx.dp_size == 2 and ctx.grad_accum_steps == 2
        model = T.Toy()
        local = 0.0
        for m, (ids, y, cu) in enumerate(window):
            out = lm_loss(model(ids), model.head, y, ctx, cu_seqlens=cu, micro_step=m, compute_mode="chunk")
            out.loss_for_backward.backward()
            local += float(out.loss_value)
        total = torch.tensor(local, dtype=torch.float64)
        dist.all_reduce(total)  # the step's loss: the sum over ranks (the trainer's one all-reduce)
        loss = float(total)
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= 2
        ref, ref_grads = T._run_split("per_token_loss", [[s]])
        assert abs(loss - ref) <= 1e-9 * abs(ref), (loss, ref)
        for p, r in zip(model.parameters(), ref_grads):
            torch.testing.assert_close(p.grad, r)
        print("rank", rank, "ok", loss)
        dist.destroy_process_group()
    """))
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": "2",
           "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0 and "ok" in out, out[-3000:]
