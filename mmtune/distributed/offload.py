"""Activation offload (model.json `text_decoder.activation_offload: true`), applied from outside the model.

While a decoder block runs forward, every tensor autograd saves for its backward is copied to host memory
(pinned on CUDA, so the copies are asynchronous) and copied back when backward needs it: the same pack /
unpack pair as `torch.autograd.graph.save_on_cpu`, with one difference that matters under FSDP2. A
block's weights are saved for backward too (a Linear keeps its weight); under FSDP2 they are the gathered
full weights, which FSDP frees after the forward and gathers again for the backward. `save_on_cpu` would
copy them to the host at every micro-batch (the whole 106B model, once per step); here tensors that are
parameters or views of one stay where they are, so only activations move.

A block that is also recomputed (activation checkpointing) saves only its input, which the checkpoint
holds itself: offloading adds nothing there, so `apply_activation_offload` skips such blocks
(train/compat.py says so when every block is recomputed).
"""

from __future__ import annotations

import torch
from torch import nn


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors to host memory while active (parameters and their views excepted). `stats` counts
    the tensors and bytes moved and the weights kept, for tests and logs."""

    def __init__(self, pin_memory: bool, stats: dict | None = None):
        self.stats = stats if stats is not None else {"tensors": 0, "bytes": 0}

        def pack(t: torch.Tensor):
            base = t._base if t._base is not None else t
            if isinstance(base, nn.Parameter):
                self.stats["kept"] = self.stats.get("kept", 0) + 1
                return t  # a weight (FSDP's gathered one) or a view of it stays
            pinned = pin_memory and t.is_cuda
            host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pinned)
            host.copy_(t, non_blocking=pinned)  # same stream as the later copy back: ordered
            self.stats["tensors"] += 1
            self.stats["bytes"] += t.numel() * t.element_size()
            return t.device, host

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            device, host = packed
            return host.to(device, non_blocking=host.is_pinned())

        super().__init__(pack, unpack)


def apply_activation_offload(blocks: list[nn.Module], *, skip: set[int] = frozenset(), pin_memory: bool = True,
                             stats: dict | None = None) -> int:
    """Offload the saved activations of `blocks` (all but the indices in `skip`: the recomputed ones) with
    forward hooks; returns how many blocks got them."""
    n = 0
    for i, block in enumerate(blocks):
        if i in skip:
            continue
        hooks: list[OffloadActivations] = []

        def enter(module, args, _hooks=hooks):
            ctx = OffloadActivations(pin_memory, stats)
            ctx.__enter__()
            _hooks.append(ctx)

        def leave(module, args, output, _hooks=hooks):
            _hooks.pop().__exit__(None, None, None)

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)
        n += 1
    return n
