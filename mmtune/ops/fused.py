"""Element-wise work around the matmuls, with hand-written backwards that do less than autograd's.

Eagerly each torch op is one pass over memory; on the CPU these passes (norms, the MoE's row permutes)
are a third of a train step next to the same matmuls transformers runs (docs/PERFORMANCE.md). Under
torch.compile inductor fuses them itself, so there each function is its plain formula (`_traced`), which
autograd differentiates and inductor fuses with its neighbours: a graph holding an autograd.Function cannot be
stored in AOTAutograd's cache, and every process would trace the joint forward and backward again
(distributed/compile.py; the measurements in docs/PERFORMANCE.md "Speed").

- `rms_norm(x, weight, eps)`: weight * (x / rms(x)), normalised in fp32 and scaled in x's dtype (as
  transformers). Saves x and the [.., 1] inverse rms, not the fp32 intermediates autograd keeps, and its
  backward is one expression instead of the composite's chain of pow/mean/rsqrt/mul backwards. In fp32
  and fp64 (x, weight and gradient of one dtype) both directions take fewer passes over [T, H]: the sum of
  squares is a norm (a read, no [T, H] temporary), and the backward's two reductions are matrix-vector
  products of one shared P = grad * x (see `_RMSNorm.backward`).
- `unpermute_sum(y_R, inverse_R, token_R, k)`: the MoE's combine, the expert outputs back to (token, slot)
  order and each token's k slots summed; the backward is one gather of the token gradients (autograd
  materialises the broadcast [T, k, H] gradient, zero-fills and scatter-adds it). (The dispatch x[order //
  k] keeps autograd's backward: its index-add into the T token rows is cheaper than un-sorting the R rows
  by a gather and summing them, measured.)
- `rope(x, cos, sin, rotate)`: a rotary embedding whose backward is the rotation by the opposite angles
  (autograd keeps the pieces and zero-fills the slices of the rotated dims).
- `swiglu(gate_up)`: silu(gate) * up of a fused [.., 2I] projection (gate first); the backward writes both
  halves' gradients straight into one [.., 2I] buffer (autograd computes them apart and concatenates).
"""

from __future__ import annotations

import torch


def _traced() -> bool:
    """Under torch.compile: run the plain formula (see the module docstring)."""
    return torch.compiler.is_compiling()


def _rms_norm(x, weight, eps: float):
    """(weight * x / rms(x), the [.., 1] fp32 inverse rms)"""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * (xf * rstd).to(x.dtype), rstd


def _full_precision(*tensors) -> bool:
    """fp32 or fp64 throughout: no casts, so `_RMSNorm`'s fewer-pass forms apply."""
    return tensors[0].dtype in (torch.float32, torch.float64) and all(t.dtype == tensors[0].dtype for t in tensors)


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        if _full_precision(x, weight):  # mean(x^2) = |x|^2 / H: one read instead of a pow pass and a mean
            rstd = torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()
            out = (x * rstd).mul_(weight)
        else:
            out, rstd = _rms_norm(x, weight, eps)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, weight = ctx.saved_tensors
        grad_w = None
        if _full_precision(x, weight, grad_out):
            # y = x r, r = rsqrt(mean(x^2) + eps), out = w y. With P = g x (row t, column h):
            #   grad_x = r (g w) - x r^3 / H * sum_h (g w x) = r (g w) - x r^3 / H * (P @ w)
            #   grad_w = sum_t g y = P^T @ r
            H = x.shape[-1]
            g_TH, x_TH, r_T = grad_out.reshape(-1, H), x.reshape(-1, H), rstd.reshape(-1)
            p_TH = g_TH * x_TH
            if ctx.needs_input_grad[1]:
                grad_w = p_TH.t().mv(r_T)
            coef_T1 = (p_TH.mv(weight) * r_T.pow(3)).div_(H).unsqueeze(-1)
            grad_x = (g_TH * weight).mul_(r_T.unsqueeze(-1)).addcmul_(x_TH, coef_T1, value=-1)
            return grad_x.view_as(x), grad_w, None
        y = x.float() * rstd
        gy = (grad_out * weight).float()
        grad_x = (gy - y * (gy * y).mean(-1, keepdim=True)) * rstd
        if ctx.needs_input_grad[1]:
            grad_w = (grad_out * y.to(grad_out.dtype)).reshape(-1, y.shape[-1]).sum(0)
        return grad_x.to(x.dtype), grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _traced():
        return _rms_norm(x, weight, eps)[0]
    return _RMSNorm.apply(x, weight, eps)


def _unpermute_sum(y_RH, inverse_R, k: int):
    return y_RH.index_select(0, inverse_R).view(-1, k, y_RH.shape[-1]).sum(1)


class _UnpermuteSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RH, inverse_R, token_R, k: int):
        ctx.save_for_backward(token_R)
        return _unpermute_sum(y_RH, inverse_R, k)

    @staticmethod
    def backward(ctx, grad_TH):
        (token_R,) = ctx.saved_tensors
        return grad_TH.index_select(0, token_R), None, None, None


def unpermute_sum(y_RH: torch.Tensor, inverse_R: torch.Tensor, token_R: torch.Tensor, k: int) -> torch.Tensor:
    """out[t] = sum over t's k slots of y: the rows of y_RH (R = T*k, in expert order) go back to (token,
    slot) order through the permutation `inverse_R` and each token's k rows are summed; `token_R` is the
    token of each row of y_RH. [T, H]."""
    if _traced():
        return _unpermute_sum(y_RH, inverse_R, k)
    return _UnpermuteSum.apply(y_RH, inverse_R, token_R, k)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, rotate):
        ctx.save_for_backward(cos, sin)
        ctx.rotate = rotate
        return rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return ctx.rotate(grad, cos, -sin), None, None, None


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotate) -> torch.Tensor:
    """`rotate(x, cos, sin)` (a rotary embedding: pairs of dims turned by angles) whose backward is the
    rotation by the opposite angles, rotate(grad, cos, -sin)."""
    if _traced():
        return rotate(x, cos, sin)
    return _Rope.apply(x, cos, sin, rotate)


def _swiglu(gate_up):
    """(silu(gate) * up, (gate, up, silu(gate)))"""
    gate, up = gate_up.chunk(2, dim=-1)
    act = torch.nn.functional.silu(gate)
    return act * up, (gate, up, act)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        out, saved = _swiglu(gate_up)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx, grad):
        gate, up, act = ctx.saved_tensors
        out = grad.new_empty(*grad.shape[:-1], 2 * grad.shape[-1])
        d_gate, d_up = out.chunk(2, dim=-1)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        torch.mul(grad, act, out=d_up)
        return out


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up where gate, up = gate_up.chunk(2, -1): [.., I]."""
    if _traced():
        return _swiglu(gate_up)[0]
    return _SwiGLU.apply(gate_up)
