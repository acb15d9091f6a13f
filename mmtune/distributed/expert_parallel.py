"""Expert parallelism: each rank of an `ep` group owns E/ep whole experts of every MoE layer, and the
tokens travel to them by all-to-all (docs/INTERNALS.md "Expert parallelism").

Applied from outside the model (`apply_expert_parallel`, called by parallelize.py before FSDP2):
- each `GroupedExperts`' `gate_up_proj` / `down_proj` becomes a DTensor on the ep mesh, `Shard(0)` on
  the expert dim (rank r of the group holds experts [r*E/ep, (r+1)*E/ep)); FSDP2 then shards those local
  experts over the expert mesh's ("dp_replicate", "efsdp") dims. Checkpoints still see the logical
  [E, ...] tensors.
- each `GroupedExperts.dispatch` (the seam in ops/moe.py) becomes an `AllToAllDispatch`.

Dispatch, per MoE layer and forward, for the expert-sorted rows of this rank (R rows, `counts_E` per
global expert; experts are numbered rank-major, so the rows for rank s form one block):
  1. counts: all_to_all of counts_E viewed [ep, E/ep] -> how many rows each rank sends for each local expert;
  2. rows and routing weights: all_to_all_single with those split sizes (autograd: the backward is the
     reverse all-to-all), received rank-major (source rank, then local expert);
  3. reorder to expert-major (local expert, then source rank) and run `expert_ffn` on the local experts;
  4. undo the reorder and all_to_all the outputs back; the experts' caller un-sorts and sums the K slots.
Dropless: no capacity, any distribution (an expert with no row, a rank whose rows are all remote, ranks
with different token counts: the split sizes differ, the collectives are the same on every rank).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from mmtune.ops.moe import GroupedExperts, expert_ffn


def expert_modules(model: nn.Module) -> list[GroupedExperts]:
    return [m for m in model.modules() if isinstance(m, GroupedExperts)]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with autograd: the backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad_out, in_splits, out_splits, ctx.group), None, None, None


class AllToAllDispatch:
    """`GroupedExperts.dispatch` under expert parallelism (see the module docstring)."""

    def __init__(self, ep_mesh: DeviceMesh, num_experts: int):
        self.group = ep_mesh.get_group()
        self.ep = ep_mesh.size()
        self.local = num_experts // self.ep

    def __call__(self, x_RH: torch.Tensor, w_R1: torch.Tensor, counts_E: torch.Tensor,
                 gate_up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        ep, local = self.ep, self.local
        # 1. rows per (source rank, local expert) that this rank will receive
        recv_counts_SL = torch.empty_like(counts_E)
        dist.all_to_all_single(recv_counts_SL, counts_E.contiguous(), group=self.group)
        recv_counts_SL = recv_counts_SL.view(ep, local)
        send_splits = counts_E.view(ep, local).sum(1).tolist()
        recv_splits = recv_counts_SL.sum(1).tolist()
        # 2. the rows and their routing weights travel to the experts' ranks
        x_recv = _AllToAll.apply(x_RH, recv_splits, send_splits, self.group)
        w_recv = _AllToAll.apply(w_R1, recv_splits, send_splits, self.group)
        # 3. rank-major -> expert-major, then the local experts (whole experts: the ep-local DTensor shard)
        order = expert_major_order(recv_counts_SL)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        y = expert_ffn(x_recv.index_select(0, order), w_recv.index_select(0, order), recv_counts_SL.sum(0),
                       _local(gate_up), _local(down))
        # 4. back to the order the rows arrived in, and back to the ranks they came from
        return _AllToAll.apply(y.index_select(0, inverse), send_splits, recv_splits, self.group)


def expert_major_order(counts_SL: torch.Tensor) -> torch.Tensor:
    """Row indices that turn a rank-major buffer (for each source rank s, for each local expert l,
    counts_SL[s, l] rows) into expert-major order (for each l, for each s)."""
    S, L = counts_SL.shape
    block_R = torch.repeat_interleave(torch.arange(S * L, device=counts_SL.device), counts_SL.reshape(-1))
    key_R = (block_R % L) * S + block_R // L  # block (s, l) -> position l*S + s
    return key_R.argsort(stable=True)


def _local(w: torch.Tensor) -> torch.Tensor:
    """The ep-local experts of a weight (FSDP2 presents the unsharded parameter as the ep DTensor)."""
    return w.to_local() if isinstance(w, DTensor) else w


def apply_expert_parallel(model: nn.Module, ep_mesh: DeviceMesh) -> int:
    """Shard every GroupedExperts' weights over the ep group (`Shard(0)`) and route its tokens by
    all-to-all. Works on a meta-device model (no communication). Returns the number of MoE layers."""
    ep, rank = ep_mesh.size(), ep_mesh.get_local_rank()
    experts = expert_modules(model)
    for module in experts:
        if module.num_experts % ep:
            raise ValueError(f"--expert-model-parallel-size {ep} must divide the model's n_routed_experts "
                             f"{module.num_experts}")
        n = module.num_experts // ep
        for name in ("gate_up_proj", "down_proj"):
            full = getattr(module, name)
            local = full.detach()[rank * n : (rank + 1) * n].clone()
            dt = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False, shape=full.shape,
                                    stride=full.stride())
            setattr(module, name, nn.Parameter(dt, requires_grad=full.requires_grad))
        module.dispatch = AllToAllDispatch(ep_mesh, module.num_experts)
    return len(experts)
