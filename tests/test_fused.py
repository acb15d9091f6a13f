"""ops/fused.py's hand-written backwards against autograd of the plain formulas."""

from __future__ import annotations

import pytest
import torch

from mmtune.ops.fused import _rms_norm, rms_norm

EPS = 1e-5


def _reference(x, weight):
    """weight * x / rms(x), every step in x's own dtype (autograd differentiates it)."""
    return weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("weight_grad", [True, False])
def test_rms_norm_fp64_equals_the_formula_and_passes_gradcheck(weight_grad):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, dtype=torch.float64, generator=g).requires_grad_()
    w = torch.randn(64, dtype=torch.float64, generator=g).requires_grad_(weight_grad)
    grad = torch.randn(3, 50, 64, dtype=torch.float64, generator=g)
    inputs = (x, w) if weight_grad else (x,)
    ours = torch.autograd.grad(rms_norm(x, w, EPS), inputs, grad)
    ref = torch.autograd.grad(_reference(x, w), inputs, grad)
    torch.testing.assert_close(rms_norm(x, w, EPS), _reference(x, w), rtol=0, atol=1e-13)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    small = (x[:2, :3, :8].detach().requires_grad_(), w[:8].detach().requires_grad_())
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, EPS), small)


def test_rms_norm_fp32_non_contiguous_input_matches_fp64():
    g = torch.Generator().manual_seed(1)
    x64 = torch.randn(4, 96, 33, dtype=torch.float64, generator=g).transpose(1, 2)  # [4, 33, 96], strided
    w64 = torch.randn(96, dtype=torch.float64, generator=g)
    grad64 = torch.randn(4, 33, 96, dtype=torch.float64, generator=g)
    x, w = x64.float().requires_grad_(), w64.float().requires_grad_()
    out = rms_norm(x, w, EPS)
    dx, dw = torch.autograd.grad(out, (x, w), grad64.float())
    x64.requires_grad_(), w64.requires_grad_()
    ref = _reference(x64, w64)
    rdx, rdw = torch.autograd.grad(ref, (x64, w64), grad64)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx.double(), rdx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw.double(), rdw, rtol=1e-5, atol=1e-4)


def test_rms_norm_bf16_keeps_transformers_rounding():
    """bf16: normalised in fp32, scaled in bf16, exactly as the plain formula (which is transformers')."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 40, 64, generator=g).bfloat16().requires_grad_()
    w = (1 + 0.1 * torch.randn(64, generator=g)).bfloat16().requires_grad_()
    grad = torch.randn(2, 40, 64, generator=g).bfloat16()
    out = rms_norm(x, w, EPS)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, _rms_norm(x, w, EPS)[0], rtol=0, atol=0)
    dx, dw = torch.autograd.grad(out, (x, w), grad)
    rdx, rdw = torch.autograd.grad(_rms_norm(x, w, EPS)[0], (x, w), grad)
    torch.testing.assert_close(dx, rdx, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dw, rdw, rtol=2e-2, atol=1e-1)
