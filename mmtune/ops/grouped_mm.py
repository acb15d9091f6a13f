"""torch's grouped matmul (`torch._grouped_mm`, the MoE experts' projections), traceable on the CPU.

Eagerly, and when compiling for CUDA, this is `torch._grouped_mm` itself. torch.compile on the CPU
cannot trace it: the op's shape function (its "meta" kernel) still insists on CUDA's bf16 inputs,
although the CPU kernel takes fp32/bf16/fp16. So when compiling for the CPU the call goes through the
custom ops below, whose shape functions are right and whose kernels are the same `torch._grouped_mm`
calls (forward, and the two that make up its backward), i.e. the same numbers as eagerly.

Legend: R rows (sorted by group), K inner size, N output size, E groups; `offs` [E] int32 = cumulative rows.
"""

from __future__ import annotations

import torch

_GROUPED_MM = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


@torch.library.custom_op("mmtune::grouped_mm", mutates_args=(), device_types="cpu")
def _grouped_mm_op(a_RK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return torch._grouped_mm(a_RK, b_EKN, offs=offs_E)


@_grouped_mm_op.register_fake
def _(a_RK, b_EKN, offs_E):
    return a_RK.new_empty(a_RK.shape[0], b_EKN.shape[2])


@torch.library.custom_op("mmtune::grouped_mm_weight_grad", mutates_args=(), device_types="cpu")
def _weight_grad_op(a_RK: torch.Tensor, grad_RN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """d(out)/d(b) of `_grouped_mm(a, b, offs)`: per group a_e^T @ grad_e, [E, K, N]."""
    return torch._grouped_mm(a_RK.t(), grad_RN, offs=offs_E)


@_weight_grad_op.register_fake
def _(a_RK, grad_RN, offs_E):
    return a_RK.new_empty(offs_E.shape[0], a_RK.shape[1], grad_RN.shape[1])


def _setup_context(ctx, inputs, output):
    a_RK, b_EKN, offs_E = inputs
    ctx.save_for_backward(a_RK, b_EKN, offs_E)


def _backward(ctx, grad_RN):
    a_RK, b_EKN, offs_E = ctx.saved_tensors
    grad_RN = grad_RN.contiguous()  # the kernel wants 16-byte strides (a broadcast gradient has 0)
    grad_a = _grouped_mm_op(grad_RN, b_EKN.transpose(1, 2), offs_E) if ctx.needs_input_grad[0] else None
    grad_b = _weight_grad_op(a_RK, grad_RN, offs_E) if ctx.needs_input_grad[1] else None
    return grad_a, grad_b, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(a_RK: torch.Tensor, b_EKN: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """`a[rows of group e] @ b[e]` for every group e: [R, N]."""
    if a_RK.device.type == "cpu" and torch.compiler.is_compiling():
        return _grouped_mm_op(a_RK, b_EKN, offs_E)
    return _GROUPED_MM(a_RK, b_EKN, offs=offs_E)
