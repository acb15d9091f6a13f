"""LoRA layers: a trainable low-rank update added to a frozen projection, for `nn.Linear` and for the
stacked routed experts (`GroupedExperts`).

    y = x W^T + b + s * (dropout(x) A^T) B^T          s = alpha / r,  B = 0 at init (y unchanged)

Linear: `lora_A` [r, in] and `lora_B` [out, r] sit on the Linear beside `weight` / `bias`.
Experts: for each stacked projection p of `GroupedExperts` (gate_up_proj [E, 2I, H], down_proj [E, H, I])
`p_lora_A` [E, r, in] and `p_lora_B` [E, out, r]: one adapter per expert. The rows that reach the experts
are already sorted by expert with per-expert counts, so the update runs as two more grouped matmuls over
the same rows, (x_R A_e^T) B_e^T: O(rows * r * (in + out)) work, and the [E, out, in] delta is never built
(eagerly on the CPU an expert with more rows than `in` goes through its own merged weight, which is then
cheaper and smaller than its output rows: `_PerExpertLoRA`).
It enters the local expert computation (`ops.moe.expert_ffn`) as a `LoRAProjection` in place of the weight.
The leading expert dim of the adapters is the experts' own, so whatever splits the experts (expert
parallelism shards dim 0) splits their adapters with them.

Wrapping keeps the base parameter objects and names (`wrap_linear`, `wrap_experts`): a base checkpoint
loads unchanged, and adapter names are the base module's name + `.lora_A` / `.lora_B` (Linear) or
+ `.{p}_lora_A` / `.{p}_lora_B` (experts); docs/INTERNALS.md "LoRA".

Legend: R rows (sorted by expert), E experts, r rank, In/Out the projection's input/output width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.ops.moe import GroupedExperts, grouped_linear

EXPERT_PROJECTIONS = ("gate_up_proj", "down_proj")


def is_adapter_name(name: str) -> bool:
    """True for an adapter parameter name (`...lora_A`, `...lora_B`, `..._lora_A`, `..._lora_B`)."""
    return name.endswith(("lora_A", "lora_B"))


def lora_delta(A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The dense update s * B A: [out, in] for a Linear, [E, out, in] for stacked experts (export, tests)."""
    return scale * (B @ A)


def init_lora_(A: torch.Tensor, B: torch.Tensor, generator: torch.Generator) -> None:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (nn.Linear's and PEFT's kaiming-uniform(a=sqrt(5))), B = 0. Drawn in
    fp32 on the CPU generator, so every device and rank gets the same numbers."""
    bound = 1.0 / math.sqrt(A.shape[-1])
    with torch.no_grad():
        A.copy_(torch.empty(A.shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator))
        B.zero_()


def _same_module_as(cls: type, module: nn.Module) -> nn.Module:
    """An instance of `cls` (a subclass of type(module)) with `module`'s plain attributes (sizes, a dispatch
    hook, ...) but none of its parameters yet: the caller hands over the same Parameter objects."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    new.__dict__.update({k: v for k, v in module.__dict__.items() if not k.startswith("_") and k != "training"})
    new.training = module.training
    return new


def _dropout(p: float) -> nn.Module:
    return nn.Dropout(p) if p > 0 else nn.Identity()


def _adapter(shape: tuple[int, ...], like: torch.Tensor) -> nn.Parameter:
    """An fp32 adapter parameter on the base weight's device (meta while the model is built on meta)."""
    return nn.Parameter(torch.zeros(shape, dtype=torch.float32, device=like.device))


class LoRALinear(nn.Linear):
    """An nn.Linear (same `weight`, `bias`) plus `lora_A` [r, in], `lora_B` [out, r] and dropout."""

    r: int
    scale: float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        # the scale multiplies the narrow [.., r] intermediate, not the [.., out] update
        return y + F.linear(F.linear(h, self.lora_A) * self.scale, self.lora_B).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, scale={self.scale:g}"


def wrap_linear(linear: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> LoRALinear:
    """A LoRALinear holding `linear`'s own weight and bias Parameters (no copy) and fresh adapters
    (zeros: call `init_lora_` or load them)."""
    if isinstance(linear, LoRALinear):
        raise ValueError("this Linear already has a LoRA adapter")
    new = _same_module_as(LoRALinear, linear)
    new.weight = linear.weight
    new.bias = linear.bias
    new.r, new.scale = r, alpha / r
    new.lora_A = _adapter((r, linear.in_features), linear.weight)
    new.lora_B = _adapter((linear.out_features, r), linear.weight)
    new.lora_dropout = _dropout(dropout)
    return new


@dataclass(frozen=True)
class LoRAProjection:
    """A stacked expert weight [E, Out, In] with its per-expert adapters A [E, r, In], B [E, Out, r]: what
    `ops.moe.project` applies to the sorted rows (the base grouped matmul plus `grouped_lowrank`)."""

    weight: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    scale: float
    dropout: nn.Module

    def project(self, x_RIn: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        if _per_expert_ok(x_RIn, self):
            return _PerExpertLoRA.apply(x_RIn, self.weight, self.A, self.B, counts_E, self.scale)
        y_ROut = grouped_linear(x_RIn, self.weight, counts_E)
        return y_ROut + grouped_lowrank(self.dropout(x_RIn), self.A, self.B, counts_E, self.scale).to(y_ROut.dtype)

    def map(self, fn) -> "LoRAProjection":
        """The same projection with `fn` applied to its three tensors (e.g. taking a rank's local experts)."""
        return LoRAProjection(fn(self.weight), fn(self.A), fn(self.B), self.scale, self.dropout)


class LoRAGroupedExperts(GroupedExperts):
    """GroupedExperts (same `gate_up_proj`, `down_proj`) plus one adapter per expert for each projection in
    `self.adapted`: `{p}_lora_A` [E, r, In], `{p}_lora_B` [E, Out, r]."""

    r: int
    scale: float
    adapted: tuple[str, ...]

    def projection(self, name: str):
        if name not in self.adapted:
            return getattr(self, name)
        return LoRAProjection(getattr(self, name), getattr(self, f"{name}_lora_A"), getattr(self, f"{name}_lora_B"),
                              self.scale, self.lora_dropout)

    def extra_repr(self) -> str:
        return f"adapted={list(self.adapted)}, r={self.r}, scale={self.scale:g}"


def wrap_experts(experts: GroupedExperts, r: int, alpha: float, dropout: float = 0.0,
                 projections: tuple[str, ...] = EXPERT_PROJECTIONS) -> LoRAGroupedExperts:
    """A LoRAGroupedExperts holding `experts`' own stacked Parameters and fresh per-expert adapters."""
    if isinstance(experts, LoRAGroupedExperts):
        raise ValueError("these experts already have LoRA adapters")
    unknown = set(projections) - set(EXPERT_PROJECTIONS)
    if unknown or not projections:
        raise ValueError(f"expert projections {sorted(unknown) or '()'}: choose from {EXPERT_PROJECTIONS}")
    new = _same_module_as(LoRAGroupedExperts, experts)
    new.gate_up_proj, new.down_proj = experts.gate_up_proj, experts.down_proj
    new.r, new.scale, new.adapted = r, alpha / r, tuple(p for p in EXPERT_PROJECTIONS if p in projections)
    for p in new.adapted:
        E, out, inp = getattr(new, p).shape
        setattr(new, f"{p}_lora_A", _adapter((E, r, inp), getattr(new, p)))
        setattr(new, f"{p}_lora_B", _adapter((E, out, r), getattr(new, p)))
    new.lora_dropout = _dropout(dropout)
    return new


def grouped_lowrank(x_RIn: torch.Tensor, A_ErIn: torch.Tensor, B_EOutr: torch.Tensor, counts_E: torch.Tensor,
                    scale: float = 1.0) -> torch.Tensor:
    """s (x A_e^T) B_e^T for each expert's block of the sorted rows: [R, Out] (s scales the [R, r] middle).
    Two grouped matmuls over the same rows (`grouped_linear`): O(R * r * (In + Out)). (Eagerly on the CPU
    `LoRAProjection.project` takes `_PerExpertLoRA` instead.)"""
    return grouped_linear(grouped_linear(x_RIn, A_ErIn, counts_E) * scale, B_EOutr, counts_E)


# The CPU path of `LoRAProjection.project`: one expert at a time, base and adapters together (below). Tests
# switch it off to check the grouped path on the CPU.
PER_EXPERT_ON_CPU = True


def _per_expert_ok(x_RIn: torch.Tensor, proj: LoRAProjection) -> bool:
    """The per-expert path: eager CPU, one dtype, a frozen base and no dropout (else the grouped path)."""
    no_dropout = isinstance(proj.dropout, nn.Identity) or not proj.dropout.training
    return (PER_EXPERT_ON_CPU and x_RIn.device.type == "cpu" and not torch.compiler.is_compiling() and no_dropout
            and not proj.weight.requires_grad and x_RIn.dtype == proj.weight.dtype == proj.A.dtype == proj.B.dtype)


# An expert with more rows than MERGE_ROWS x the width the low-rank product would save runs through its
# merged weight W_e + s B_e A_e (see _PerExpertLoRA: kept from the forward, or made in the backward alone);
# math.inf switches it off (tests check both forms).
MERGE_ROWS = 1.0


def _merge_above(width: int, dtype: torch.dtype) -> float:
    """Row count above which an expert's product runs through its merged weight (fp32/fp64 only: in bf16
    W + s B A would round the update to the base weight's precision)."""
    return MERGE_ROWS * width if dtype in (torch.float32, torch.float64) else math.inf


class _PerExpertLoRA(torch.autograd.Function):
    """y = x W_e^T + s (x A_e^T) B_e^T over each expert's block of the sorted rows, on the CPU.

    The same products as the grouped path (base grouped matmul + `grouped_lowrank`), taken one expert at a
    time so that the expert's rows are still in cache for the narrow adapter products, and accumulated in
    place (`addmm_`, the base matmul last) instead of adding [R, Out] / [R, In] tensors: on the CPU this took
    the adapters' overhead over the base experts from PEFT's to 1.6-2.0x (16 experts) / 3.5-4.3x (128) below
    it (docs/PERFORMANCE.md "LoRA"). An expert with more rows than the width a low-rank product would
    save runs instead through its merged weight W_e + s B_e A_e: that costs Out*r*In, less than the
    rows*r*Out (forward: s h B^T) or rows*r*In (backward: s dh A) product it replaces, so the work stays
    O(rows * r * (In + Out)) on top of the base. Merged in the forward (rows > In), the weight is kept for the
    backward: Out*In < rows*Out elements, less than the expert's output rows, so never the size of an
    [E, Out, In] delta beyond the output it makes; merged in the backward alone (In >= rows > Out), it is
    made in one reused buffer. A's and B's gradients come from the low-rank products either way. The base W
    is frozen (no gradient); x, A and B get theirs. Under
    torch.compile and on CUDA the grouped path runs instead (a loop over the counts' values would break the
    graph; on a GPU the grouped matmuls are the fast form)."""

    @staticmethod
    def forward(ctx, x_RIn, W_EOutIn, A_ErIn, B_EOutr, counts_E, scale):
        counts = counts_E.tolist()
        _, Out, In = W_EOutIn.shape
        y_ROut = x_RIn.new_empty(x_RIn.shape[0], Out)
        h_Rr = x_RIn.new_empty(x_RIn.shape[0], A_ErIn.shape[1])  # x A_e^T, kept for B's gradient
        merge = _merge_above(In, x_RIn.dtype)
        merged = [e for e, n in enumerate(counts) if n > merge]
        # the merged experts' weights, kept for the backward: each has Out*In < rows*Out elements, so all of
        # them together hold fewer than y_ROut
        Wm_MOutIn = W_EOutIn.new_empty(len(merged), Out, In)
        slot = dict(zip(merged, Wm_MOutIn.unbind()))
        # per-expert views made by one call each (the loop's Python cost is what this path is short of)
        for e, (x, y, h, W, At, B) in enumerate(zip(x_RIn.split(counts), y_ROut.split(counts), h_Rr.split(counts),
                                                    W_EOutIn.unbind(), A_ErIn.transpose(1, 2).unbind(),
                                                    B_EOutr.unbind())):
            if not x.shape[0]:
                continue
            torch.mm(x, At, out=h)
            if e in slot:  # W + s B A costs less than s h B^T: y = x (W + s B A)^T
                torch.mm(x, torch.addmm(W, B, At.t(), alpha=scale, out=slot[e]).t(), out=y)
            else:
                y.addmm_(h, B.t(), beta=0, alpha=scale)  # s scales the narrow product, as in the grouped path
                y.addmm_(x, W.t())  # the base last: its matmul adds into y while y is in cache
        ctx.save_for_backward(x_RIn, W_EOutIn, A_ErIn, B_EOutr, h_Rr, Wm_MOutIn)
        ctx.counts, ctx.scale, ctx.merged = counts, scale, merged
        return y_ROut

    @staticmethod
    def backward(ctx, grad_ROut):
        x_RIn, W_EOutIn, A_ErIn, B_EOutr, h_Rr, Wm_MOutIn = ctx.saved_tensors
        counts, s = ctx.counts, ctx.scale
        grad_ROut = grad_ROut.contiguous()
        grad_x = torch.empty_like(x_RIn)
        grad_A = torch.zeros_like(A_ErIn)  # an expert without rows: 0
        # B's gradient is made as its transpose [E, r, Out]: this CPU's matmuls with 16 output rows run about
        # twice as fast as with 16 output columns (docs/PERFORMANCE.md "LoRA")
        grad_Bt = B_EOutr.new_zeros(B_EOutr.shape[0], B_EOutr.shape[2], B_EOutr.shape[1])
        dh_Rr = x_RIn.new_empty(h_Rr.shape)  # d(loss)/d(x A_e^T) / s
        _, Out, In = W_EOutIn.shape
        merge = _merge_above(Out, x_RIn.dtype)
        kept = dict(zip(ctx.merged, Wm_MOutIn.unbind()))
        Wm = W_EOutIn.new_empty(Out, In) if any(n > merge for e, n in enumerate(counts) if e not in kept) else None
        for e, (g, dx, dh, x, h, W, A, B, gA, gBt) in enumerate(zip(
                grad_ROut.split(counts), grad_x.split(counts), dh_Rr.split(counts), x_RIn.split(counts),
                h_Rr.split(counts), W_EOutIn.unbind(), A_ErIn.unbind(), B_EOutr.unbind(), grad_A.unbind(),
                grad_Bt.unbind())):
            if not x.shape[0]:
                continue
            torch.mm(g, B, out=dh)
            if e in kept:  # the forward's merged weight: dx = g (W + s B A)
                torch.mm(g, kept[e], out=dx)
            elif x.shape[0] > merge:  # merged here: cheaper than s dh A
                torch.mm(g, torch.addmm(W, B, A, alpha=s, out=Wm), out=dx)
            else:
                dx.addmm_(dh, A, beta=0, alpha=s)
                dx.addmm_(g, W)  # the base last, as in the forward
            gBt.addmm_(h.t(), g, beta=0, alpha=s)
            gA.addmm_(dh.t(), x, beta=0, alpha=s)
        return grad_x, None, grad_A, grad_Bt.transpose(1, 2), None, None


def adapter_pairs(module: nn.Module) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(base parameter's local name, A, B) of a LoRA module: [("weight", A, B)] for a LoRALinear,
    [("gate_up_proj", A, B), ...] for LoRAGroupedExperts; [] for anything else."""
    if isinstance(module, LoRALinear):
        return [("weight", module.lora_A, module.lora_B)]
    if isinstance(module, LoRAGroupedExperts):
        return [(p, getattr(module, f"{p}_lora_A"), getattr(module, f"{p}_lora_B")) for p in module.adapted]
    return []
