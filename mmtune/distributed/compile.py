"""`--use-torch-compile`: torch.compile each decoder layer and vision block, from outside the model.

Per block, as torchtitan does: the blocks of one tower share their code, so one compiled graph serves
every layer of a kind (GLM-4.5V: the dense layer(s), the MoE layers, the vision blocks — three graphs
whatever the depth), compile time does not grow with depth, and FSDP2 keeps sharding and prefetching
per block. Order (parallelize.py): activation checkpointing -> compile -> FSDP2.

What is compiled is each block's `forward` (an instance attribute wrapping the compiled function), not
the module call: the module's hooks — FSDP2's all-gather/reshard and the composable activation
checkpointing — stay outside the graph and run as they do eagerly, and parameter names do not change
(checkpoints are unaffected).

Shapes: the token dimension of a block's inputs changes from batch to batch (padded micro-batches are
as long as their longest sample, images differ in patches, packed rows differ in segments). Every
dimension but the last of every tensor argument (dataclass fields included: the attention mask's
`cu_seqlens`) is marked dynamic before the first call, so the block compiles once for all lengths
instead of once per length (`torch._dynamo.maybe_mark_dynamic`: a dimension the graph needs constant,
such as a size-1 batch, is specialised instead). `dynamic=False` compiles for the first shapes seen
(the fastest kernels for fixed-shape runs; torch recompiles on a new shape).

Under context or expert parallelism the seam they replace (`attention_fn`: Ulysses all-to-alls;
`dispatch`: the experts' all-to-all) runs eagerly inside the compiled block — one graph break around the
collectives, whose split sizes depend on the data.

What keeps the graphs whole on one device (no graph break per layer): the MoE's per-expert row counts come from a
scatter-add (a fixed-size output, not `bincount`), the grouped expert matmul goes through a custom op on
the CPU (ops/grouped_mm.py), and attention over packed segments is one custom op on the CPU
(ops/segment_attention.py) or torch's varlen flash op on CUDA. Inductor then fuses the element-wise
work around the matmuls — RMSNorm and the residual add, rope, SwiGLU, the router's sigmoid / top-k
weights / normalisation, the routing-weight scaling and the unpermute-and-sum — which is where eager
mode loses its time (docs/PERFORMANCE.md).

What keeps the compile cached across processes: no autograd.Function in a graph (ops/fused.py traces the
plain formulas), so AOTAutograd's cache stores each block's forward and backward and a restarted run (or
another rank on the machine) loads them instead of tracing them again; only dynamo's bytecode tracing is
repeated (the demo's compile with a warm cache: 5.9 s instead of 15.9 s, docs/PERFORMANCE.md).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn


def _mark_dynamic(value, depth: int = 0) -> None:
    """Every dimension but the last of each tensor in `value` (tensors, tuples/lists, dataclasses) may be
    dynamic."""
    if isinstance(value, torch.Tensor):
        for dim in range(value.dim() - 1 if value.dim() > 1 else value.dim()):
            torch._dynamo.maybe_mark_dynamic(value, dim)
    elif depth < 2 and isinstance(value, (tuple, list)):
        for v in value:
            _mark_dynamic(v, depth + 1)
    elif depth < 2 and dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _mark_dynamic(getattr(value, f.name), depth + 1)


BACKEND = "inductor"  # torch.compile's backend when none is given (tests trace with "aot_eager": no code generation)


# A scalar read from a tensor inside a block (the vision tower's longest image, which CUDA's varlen flash
# kernel takes as an int) stays in the graph as a symbol instead of breaking it.
_SCALARS_IN_GRAPH = None

SEAMS = ("attention_fn", "dispatch")  # the model's parallelism seams (context and expert parallelism replace them)


def _eager_seams(block: nn.Module) -> int:
    """A seam that context or expert parallelism replaced (collectives with data-dependent split sizes) runs
    eagerly inside the compiled block: one clean graph break around it instead of dynamo tracing into the
    collectives. The model's own single-device functions (mmtune.ops) are traced."""
    n = 0
    for module in block.modules():
        for attr in SEAMS:
            fn = getattr(module, attr, None)
            if fn is not None and not getattr(fn, "__module__", "").startswith("mmtune.ops"):
                setattr(module, attr, torch.compiler.disable(fn, recursive=True))
                n += 1
    return n


def compile_block(block: nn.Module, *, dynamic: bool = True, backend: str | None = None) -> nn.Module:
    """Replace `block.forward` by its torch.compile'd version (in place; returns the block)."""
    global _SCALARS_IN_GRAPH
    if getattr(block, "_mmtune_compiled", False):
        return block
    if _SCALARS_IN_GRAPH is None:
        _SCALARS_IN_GRAPH = torch._dynamo.config.patch(capture_scalar_outputs=True)
    _eager_seams(block)
    compiled = torch.compile(block.forward, backend=backend or BACKEND, dynamic=None if dynamic else False)

    @functools.wraps(block.forward)
    def forward(*args, **kwargs):
        if dynamic:
            _mark_dynamic(args)
            _mark_dynamic(tuple(kwargs.values()))
        with _SCALARS_IN_GRAPH:
            return compiled(*args, **kwargs)

    block.forward = forward
    block._mmtune_compiled = True
    return block


def apply_compile(model: nn.Module, *, vision: bool = True, dynamic: bool = True, backend: str | None = None) -> int:
    """Compile every decoder layer (and vision block) of a GLM-4.5V-family model; returns the number of
    blocks compiled. Applied after activation checkpointing and before FSDP2 (parallelize.py)."""
    from mmtune.distributed.parallelize import blocks_of

    vision_blocks, text_blocks = blocks_of(model)
    blocks = text_blocks + (vision_blocks if vision else [])
    for block in blocks:
        compile_block(block, dynamic=dynamic, backend=backend)
    return len(blocks)


def compile_counters() -> dict[str, int]:
    """Graphs and frames compiled and graph breaks so far in this process (torch._dynamo's counters). A
    recompilation shows as frames compiled growing after the first step."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "frames_compiled": int(counters["frames"].get("ok", 0)),
        "graph_breaks": int(sum(counters["graph_break"].values())),
    }
