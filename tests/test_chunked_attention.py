"""ops/chunked_attention.py: the CPU causal attention that keeps its probabilities equals SDPA's math kernel
in fp64 (output and every gradient) for any length, grouping and input layout, behaves as a custom op
under torch.compile, and ops/attention.py picks it exactly where it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from mmtune.ops import attention as attention_mod
from mmtune.ops import chunked_attention
from mmtune.ops.attention import build_mask


def _inputs(B, H, G, S, D, layout, seed=0, dtype=torch.float32):
    """q [B, H, S, D], k, v [B, G, S, D] leaves in the layout the model hands over: "contiguous",
    "bshd" (transposed views of [B, S, heads, D], as after the projections) or "fused" (slices of one
    [B, H + 2G, S, D] tensor, as after the dense model's joint q/k rotary)."""
    g = torch.Generator().manual_seed(seed)
    if layout == "contiguous":
        q, k, v = (torch.randn(B, h, S, D, generator=g, dtype=dtype) for h in (H, G, G))
    elif layout == "bshd":
        q, k, v = (torch.randn(B, S, h, D, generator=g, dtype=dtype).transpose(1, 2) for h in (H, G, G))
    else:
        q, k, v = torch.randn(B, H + 2 * G, S, D, generator=g, dtype=dtype).split([H, G, G], dim=1)
    return [t.detach().requires_grad_() for t in (q, k, v)]


def _reference(q, k, v, grad_out, scale=None):
    """Output and gradients from SDPA's math kernel in fp64."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    with sdpa_kernel(SDPBackend.MATH):
        out = F.scaled_dot_product_attention(q64, k64, v64, is_causal=True, scale=scale, enable_gqa=True)
    out.backward(grad_out.double())
    return out, q64.grad, k64.grad, v64.grad


@pytest.mark.parametrize(
    "B,H,G,S,layout",
    [
        (2, 4, 2, 256, "bshd"),  # chunks of CHUNK, two query heads per group
        (1, 4, 1, 200, "fused"),  # a short last chunk, one key/value head for all
        (2, 3, 3, 130, "contiguous"),  # no grouping, a 2-position last chunk
        (1, 8, 2, 1, "contiguous"),  # one position
        (1, 2, 1, 64, "bshd"),  # exactly one chunk
    ],
)
def test_equals_math_attention_in_fp64(B, H, G, S, layout):
    D = 16
    q, k, v = _inputs(B, H, G, S, D, layout)
    grad_out = torch.randn(B, H, S, D, generator=torch.Generator().manual_seed(1))
    scale = 0.3 if S == 200 else None  # an explicit scale, and the default 1/sqrt(D)
    out = chunked_attention.chunked_causal_attention(q, k, v, scale)
    out.backward(grad_out)
    ref_out, ref_dq, ref_dk, ref_dv = _reference(q, k, v, grad_out, scale)
    pairs = [("out", out, ref_out), ("dq", q.grad, ref_dq), ("dk", k.grad, ref_dk), ("dv", v.grad, ref_dv)]
    for name, got, want in pairs:
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6, msg=name)
    # the output is [B, H, S, D] over [B, S, H, D] memory: the model's transpose + reshape is free
    assert out.transpose(1, 2).is_contiguous()


def test_custom_op_registration_passes_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch, as torch.library checks
    them: what torch.compile relies on."""
    q, k, v = _inputs(1, 4, 2, 70, 8, "bshd")
    torch.library.opcheck(torch.ops.mmtune.chunked_causal_attention.default, (q, k, v, 0.25))


def test_compiled_block_equals_eager():
    """Inside a compiled function the op stays one opaque call (no graph break) with the same numbers."""
    torch._dynamo.reset()

    def block(x, w):  # a projection into q, k, v, then attention, like the decoder's
        B, S, _ = x.shape
        qkv = (x @ w).view(B, S, 8, 8).transpose(1, 2)
        q, k, v = qkv.split([4, 2, 2], dim=1)
        return chunked_attention.chunked_causal_attention(q, k, v).sum(dim=1).square().sum()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 96, 16, generator=g)
    w = torch.randn(16, 64, generator=g, requires_grad=True)
    eager = block(x, w)
    (eager_grad,) = torch.autograd.grad(eager, w)
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x, w)
    (compiled_grad,) = torch.autograd.grad(compiled, w)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_grad, eager_grad)


def test_attention_uses_it_only_in_cpu_fp32_training_on_plain_causal_rows(monkeypatch):
    calls = []
    real = chunked_attention.chunked_causal_attention
    monkeypatch.setattr(chunked_attention, "chunked_causal_attention", lambda *a: calls.append(1) or real(*a))

    def run(S=256, backend="flash", grad=True, dtype=torch.float32, B=4, D=64, **mask_kw):
        q, k, v = _inputs(B, 4, 2, S, D, "bshd", dtype=dtype)  # 4 x 4 heads x 256^2 x 64: MIN_WORK exactly
        mask = build_mask(B, S, device=torch.device("cpu"), **mask_kw)
        with torch.set_grad_enabled(grad):
            out = attention_mod.attention(q, k, v, mask, backend=backend)
        if mask.cu_seqlens is None and mask.mask_B1SK is None:  # whichever kernel ran, the same attention
            with sdpa_kernel(SDPBackend.MATH):
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, enable_gqa=True)
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        used = bool(calls)
        calls.clear()
        return used

    assert run()
    assert not run(S=chunked_attention.MIN_SEQ - 1, B=5)  # short rows: flash
    assert not run(D=32) and not run(B=1)  # too little work: flash
    assert not run(backend="sdpa") and not run(backend="eager")
    assert not run(grad=False)  # inference keeps no probabilities
    assert not run(dtype=torch.float64)
    assert not run(causal=False)  # the vision tower's full attention
    assert not run(cu_seqlens=torch.tensor([0, 100, 256, 512, 768, 1024], dtype=torch.int32))  # packed: per segment
    padded = torch.ones(4, 256, dtype=torch.long)
    padded[0, :3] = 0
    assert not run(attention_mask_BK=padded)
    monkeypatch.setattr(chunked_attention, "MAX_SAVED_BYTES", 4 * chunked_attention._probs_numel(4, 4, 256) - 1)
    assert not run()  # over the memory bound: flash, which keeps none


def test_gradients_accumulate_through_the_model_layout():
    """Twice backward through one graph (retain_graph): the op's backward is a pure function of what it
    saved, so the gradients double exactly."""
    q, k, v = _inputs(1, 4, 2, 256, 8, "fused")
    out = chunked_attention.chunked_causal_attention(q, k, v)
    loss = out.square().sum()
    loss.backward(retain_graph=True)
    once = [t.grad.clone() for t in (q, k, v)]
    loss.backward()
    for a, b in zip(once, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(b, 2 * a, rtol=0, atol=0)


def test_dynamic_lengths_compile_once_and_probabilities_size_matches_the_chunks():
    """A compiled block with a dynamic sequence length (as --use-torch-compile marks it) does not
    specialise on S through the size of the kept probabilities."""
    for S in (1, 63, 64, 65, 256, 300, 1000):
        loop = sum(4 * 3 * (b - a) * b for a, b in chunked_attention._chunks(S))
        assert chunked_attention._probs_numel(4, 3, S) == loop
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):  # records each compiled graph, runs it as traced
        graphs.append(gm.code)
        return gm.forward

    mask_of = lambda S: build_mask(4, S, device=torch.device("cpu"))  # noqa: E731

    def block(q, k, v, mask):
        return attention_mod.attention(q, k, v, mask).square().sum()

    compiled = torch.compile(block, backend=backend, dynamic=True, fullgraph=True)
    for S in (256, 320, 384):
        q, k, v = _inputs(4, 4, 2, S, 64, "bshd")  # past MIN_WORK: the chunked kernel
        compiled(q, k, v, mask_of(S)).backward()
        eager_q, eager_k, eager_v = (t.detach().requires_grad_() for t in (q, k, v))
        block(eager_q, eager_k, eager_v, mask_of(S)).backward()
        torch.testing.assert_close(q.grad, eager_q.grad)
    assert len(graphs) == 1 and "chunked_causal_attention" in graphs[0]
