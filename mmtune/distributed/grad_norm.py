"""The global gradient norm and clipping, over every parameter whatever mesh it lives on.

Under FSDP2 each gradient is a DTensor: this rank holds a shard of it, and the shards of all ranks tile
the logical gradient (`Shard` / `_StridedShard` mesh dims), except along `Replicate` dims (the HSDP
replicas), where every coordinate holds the same values. With expert parallelism the experts' gradients
live on the expert mesh ("dp_replicate", "efsdp", "ep") and the rest on the dense mesh; torch's
`clip_grad_norm_` refuses to mix meshes (and reduces a multi-dim mesh in several all-reduces whose order
differs between ranks). Here: each rank sums the squares of the shards it holds — counting a replicated
shard only on replica 0 — and ONE all-reduce over every rank gives the same total to all of them, equal
to the one-rank norm. Then every gradient, dense and expert, is scaled by the one clip coefficient:
nothing is skipped.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _counted_here(grad: torch.Tensor) -> bool:
    """Whether this rank's piece of `grad` enters the sum (once per replica group)."""
    if not isinstance(grad, DTensor):  # a plain tensor is whole on every rank
        return not dist.is_initialized() or dist.get_rank() == 0
    mesh = grad.device_mesh
    return all(mesh.get_local_rank(i) == 0 for i, p in enumerate(grad.placements) if p.is_replicate())


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float = math.inf) -> float:
    """Total 2-norm of the gradients of `params` (identical on every rank; collective when distributed);
    scales them so that it is at most `max_norm` (inf or <= 0: only measure). Parameters without a
    gradient are left out."""
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    device = params[0].grad.device
    mine = [g.to_local() if isinstance(g, DTensor) else g for g in (p.grad for p in params) if _counted_here(g)]
    mine = [g for g in mine if g.numel()]
    sq = torch.stack(torch._foreach_norm(mine)).pow(2).sum() if mine else torch.zeros((), device=device)
    if dist.is_initialized():
        if dist.get_backend() == "nccl" and sq.device.type != "cuda":  # CPU-offloaded gradients
            sq = sq.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(sq)
    total = sq.to(device).sqrt()
    if 0 < max_norm < math.inf:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params]
        torch._foreach_mul_(grads, coef)
    return float(total)
