"""Apply context and expert parallelism, FSDP2, activation checkpointing and torch.compile to a GLM-4.5V
model from outside.

Order (as torchtitan does): context parallelism (hooks and the attention function, no parameters;
context_parallel.py), expert parallelism (below), activation checkpointing per block, torch.compile per
block (with --use-torch-compile, compile.py), then `fully_shard` per block — each vision block, each
decoder layer, the token embedding, the lm head — and finally the root, which takes every remaining
parameter (patch embed, merger, final norms). The model code knows nothing of it.

Module paths (docs/INTERNALS.md "Model"): `model.model.visual.blocks`, `model.model.language_model.layers`,
`model.model.language_model.embed_tokens`, `model.lm_head` — the same paths as transformers' model, so
both can be parallelized.

Expert parallelism (ep > 1, `expert_mesh` given): before checkpointing and FSDP2, distributed/expert_parallel.py
splits every MoE layer's experts over the ep ranks (DTensor `Shard(0)`) and swaps in the all-to-all
dispatch; each `mlp.experts` then gets its own FSDP2 unit on the expert mesh's ("dp_replicate", "efsdp")
dims, with its gradients divided by the dense mesh's size like every other gradient (see `_shard_experts`).

Mixed precision: FSDPOptions.param_dtype / reduce_dtype (the fsdp2 yaml's bf16 / fp32 on CUDA; `mmtune
train` passes fp32 on the CPU, where bf16 matmuls are slow). The MoE routers get their own FSDP group that
stays fp32 whatever param_dtype is, as transformers keeps them.

The lm head is used by the chunked loss outside any module forward: `unshard_lm_head(model)` gathers its
full weight before the loss; FSDP's end-of-backward callback reduce-scatters its gradient and reshards it.

Gradient accumulation (`set_gradient_sync`): every micro-batch's backward reduce-scatters each block's
gradient as soon as the block is done, so only sharded gradients accumulate across the micro-batches of a
step; an unsharded gradient never outlives its block's backward. Under HSDP the all-reduce across replicas
is deferred to the step's last micro-batch (FSDP2 sums the reduce-scatter outputs in the meantime).

Prefetch (`num_to_forward_prefetch` / `num_to_backward_prefetch`) follows the order the blocks run in:
`forward_order(model)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Shard

from mmtune.config_files import DTYPE_NAMES
from mmtune.distributed.context_parallel import apply_context_parallel
from mmtune.distributed.expert_parallel import apply_expert_parallel, expert_modules


def parse_dtype(name: str | torch.dtype | None, where: str = "the fsdp2 config") -> torch.dtype | None:
    """A config file's dtype spelling (mmtune.config_files.DTYPE_NAMES: bf16, fp32, ...) as a torch.dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return getattr(torch, DTYPE_NAMES[str(name).lower()])
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} in {where}: use one of {sorted(DTYPE_NAMES)}") from None


@dataclass
class FSDPOptions:
    """The fsdp2 yaml settings that shape sharding (recipe names in comments)."""

    reshard_after_forward: bool = True  # reshard_after_forward
    param_dtype: torch.dtype | None = None  # param_dtype: compute dtype of unsharded params (CUDA only)
    reduce_dtype: torch.dtype | None = None  # reduce_dtype: gradient reduce-scatter dtype (CUDA only)
    cast_forward_inputs: bool = True  # cast_forward_inputs
    forward_prefetch: int = 0  # num_to_forward_prefetch: blocks all-gathered ahead in forward
    backward_prefetch: int = 0  # num_to_backward_prefetch: blocks all-gathered ahead in backward
    cpu_offload: bool = False  # offload_to_cpu: sharded params, grads and optimizer state live on the CPU
    activation_checkpointing: bool = False  # --recompute-granularity full: recompute blocks in backward
    recompute_num_layers: int | None = None  # --recompute-method block: only the first N blocks (None: all)
    checkpoint_vision: bool = True  # also recompute vision blocks (only matters when they train)
    activation_offload: bool = False  # model.json activation_offload: saved activations of decoder blocks to host
    torch_compile: bool = False  # --use-torch-compile: torch.compile each block (distributed/compile.py)
    compile_backend: str | None = None  # torch.compile backend (None: compile.BACKEND, inductor)

    @classmethod
    def from_config(cls, cfg, *, activation_checkpointing: bool = False,
                    recompute_num_layers: int | None = None) -> "FSDPOptions":
        """From the fsdp2 yaml model (attribute names as in the recipe's fsdp2_config.yaml)."""
        get = lambda k, d: getattr(cfg, k, d) if cfg is not None else d  # noqa: E731
        return cls(
            reshard_after_forward=bool(get("reshard_after_forward", True)),
            param_dtype=parse_dtype(get("param_dtype", None)),
            reduce_dtype=parse_dtype(get("reduce_dtype", None)),
            cast_forward_inputs=bool(get("cast_forward_inputs", True)),
            forward_prefetch=int(get("num_to_forward_prefetch", 0) or 0),
            backward_prefetch=int(get("num_to_backward_prefetch", 0) or 0),
            cpu_offload=bool(get("offload_to_cpu", False)),
            activation_checkpointing=activation_checkpointing,
            recompute_num_layers=recompute_num_layers,
        )


def blocks_of(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """(vision blocks, decoder layers) of a GLM-4.5V model; ValueError naming the missing path."""
    try:
        inner = model.model
        vision, text = list(inner.visual.blocks), list(inner.language_model.layers)
    except AttributeError as e:
        raise ValueError(f"{type(model).__name__} has no model.visual.blocks / model.language_model.layers "
                         f"(docs/INTERNALS.md 'Model'): {e}") from None
    return vision, text


def apply_activation_checkpointing(model: nn.Module, *, vision: bool = True, num_layers: int | None = None) -> int:
    """Recompute decoder layers (and vision blocks) in backward — all of them, or the first `num_layers` of
    each tower. Composable API: parameter names do not change, so checkpoints are unaffected. Returns the
    number of blocks wrapped."""
    from torch.distributed._composable import checkpoint

    vision_blocks, text_blocks = blocks_of(model)
    n = num_layers
    blocks = text_blocks[:n] + (vision_blocks[:n] if vision else [])
    for block in blocks:
        checkpoint(block)
    return len(blocks)


def _mp_policy(opts: FSDPOptions) -> MixedPrecisionPolicy:
    return MixedPrecisionPolicy(param_dtype=opts.param_dtype, reduce_dtype=opts.reduce_dtype,
                                cast_forward_inputs=opts.cast_forward_inputs)


def router_modules(model: nn.Module) -> list[nn.Module]:
    """The MoE routers (`mlp.gate`: a weight and the fp32 `e_score_correction_bias` buffer)."""
    return [m for m in model.modules()
            if hasattr(m, "e_score_correction_bias") and isinstance(getattr(m, "weight", None), nn.Parameter)]


def store_frozen_in(model: nn.Module, dtype: torch.dtype | None) -> int:
    """Keep every frozen floating-point parameter in `dtype` (the compute dtype, FSDP's param_dtype): a frozen
    weight has no gradient or optimizer state, so an fp32 copy only doubles its memory and all-gather
    traffic; the values computed with are the same. Routers stay fp32 (they compute in fp32). Call on
    the (meta) model before `parallelize`. Returns the number of parameters changed."""
    if dtype is None or dtype == torch.float32:
        return 0
    routers = {id(p) for r in router_modules(model) for p in r.parameters()}
    changed = 0
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad or id(p) in routers or not p.is_floating_point() or p.dtype == dtype:
                continue
            setattr(module, name, nn.Parameter(p.detach().to(dtype), requires_grad=False))
            changed += p.numel()
    return changed


def parallelize(model: nn.Module, mesh: DeviceMesh | None, opts: FSDPOptions, device: torch.device, *,
                cp_mesh: DeviceMesh | None = None, expert_mesh: DeviceMesh | None = None) -> nn.Module:
    """Context and expert parallelism, activation checkpointing, FSDP2 per block, in place; returns the model.

    Works on a meta-device model (then `materialize(model, device)` and load weights) or a real one.
    mesh: 1-D ("fsdp",) = FSDP over the shard group; 2-D ("dp_replicate", "fsdp") = HSDP (ParallelDims). None (no process
    group): only activation checkpointing is applied. cp_mesh (ParallelDims.cp_mesh): Ulysses context
    parallelism over its ranks (distributed/context_parallel.py); it changes no parameter. expert_mesh
    (ParallelDims.expert_mesh, ("dp_replicate", "efsdp", "ep")): expert parallelism, None without.
    """
    if cp_mesh is not None:
        apply_context_parallel(model, cp_mesh)
    if expert_mesh is not None:
        apply_expert_parallel(model, expert_mesh["ep"])
    if opts.activation_checkpointing:
        apply_activation_checkpointing(model, vision=opts.checkpoint_vision, num_layers=opts.recompute_num_layers)
    if opts.activation_offload:
        from mmtune.distributed.offload import apply_activation_offload

        text_blocks = blocks_of(model)[1]
        recomputed = len(text_blocks) if opts.recompute_num_layers is None else opts.recompute_num_layers
        apply_activation_offload(text_blocks, skip=set(range(recomputed)) if opts.activation_checkpointing else set(),
                                 pin_memory=device.type == "cuda")
    if opts.torch_compile:
        from mmtune.distributed.compile import apply_compile

        apply_compile(model, backend=opts.compile_backend)
    if mesh is None:
        return model
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight is model.model.language_model.embed_tokens.weight:
        raise ValueError("tie_word_embeddings is true: FSDP2 per-module sharding needs separate embedding and "
                         "lm-head weights (GLM-4.5V does not tie them); set tie_word_embeddings false")
    mp = _mp_policy(opts)
    common = dict(mesh=mesh, mp_policy=mp)
    if opts.cpu_offload:
        common["offload_policy"] = CPUOffloadPolicy(pin_memory=device.type == "cuda")
    vision_blocks, text_blocks = blocks_of(model)
    if opts.param_dtype not in (None, torch.float32):
        # routers compute in fp32 (docs/GLM45V.md sections 5-6): their own FSDP group gathers them in fp32
        fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32,
                                    cast_forward_inputs=opts.cast_forward_inputs)
        for router in router_modules(model):
            fully_shard(router, reshard_after_forward=opts.reshard_after_forward,
                        **{**common, "mp_policy": fp32})
    if expert_mesh is not None:
        _shard_experts(model, mesh, expert_mesh, opts, common, device)
    for block in vision_blocks:
        fully_shard(block, reshard_after_forward=opts.reshard_after_forward, **common)
    embed = model.model.language_model.embed_tokens
    fully_shard(embed, reshard_after_forward=opts.reshard_after_forward, **common)
    for block in text_blocks:
        fully_shard(block, reshard_after_forward=opts.reshard_after_forward, **common)
    # The head is gathered right after the last layer for the loss: keeping it gathered until backward
    # saves one all-gather, at the cost of one lm-head-sized buffer.
    fully_shard(model.lm_head, reshard_after_forward=False, **common)
    # The root keeps its parameters (patch embed, merger, final norm) gathered from forward to backward:
    # they are small, backward needs them at once, and it does not depend on FSDP finding tensors in
    # the model's output object to hook the root's pre-backward.
    fully_shard(model, reshard_after_forward=False, **common)
    _set_prefetch(forward_order(model), [vision_blocks, [embed, *text_blocks]], opts)
    return model


def _shard_experts(model: nn.Module, dense_mesh: DeviceMesh, expert_mesh: DeviceMesh, opts: FSDPOptions,
                   common: dict, device: torch.device) -> None:
    """FSDP2 of each MoE layer's (ep-local) experts over the expert mesh's data dims.

    Placement: `Shard(0)` (whole experts per rank: the all-gather needs no copy) when each rank's E/ep
    experts split evenly over the efsdp ranks, else `Shard(1)` (no padding), as torchtitan does.
    Gradient scale: FSDP2 divides a gradient by the size of the mesh it reduces over — world/ep ranks for
    the experts — but each local expert's gradient already sums the tokens of the whole ep group (the
    all-to-all's backward), so it must be divided by the dense mesh's size like every dense gradient.
    (NCCL scales inside the reduce-scatter; gloo has no such op, so there FSDP2 must sum and divide after
    it — but only when there is a reduce-scatter: with one efsdp rank torch 2.13 would divide twice.)
    """
    dims = ("dp_replicate", "efsdp") if expert_mesh.size(0) > 1 else ("efsdp",)
    fsdp_mesh = expert_mesh[dims]
    efsdp = expert_mesh["efsdp"].size()
    for experts in expert_modules(model):
        local = experts.num_experts // expert_mesh["ep"].size()
        placement = Shard(0) if local % efsdp == 0 else Shard(1)
        fully_shard(experts, mesh=fsdp_mesh, reshard_after_forward=opts.reshard_after_forward,
                    shard_placement_fn=lambda p, placement=placement: placement,
                    **{k: v for k, v in common.items() if k != "mesh"})  # the expert mesh, not the dense one
        experts.set_gradient_divide_factor(float(dense_mesh.size()))
        if device.type != "cuda" and efsdp > 1:
            experts.set_force_sum_reduction_for_comms(True)


def forward_order(model: nn.Module) -> list[nn.Module]:
    """The FSDP units of the blocks in the order forward runs them: the token embedding, then the vision
    tower (the image features are scattered into the embedded tokens, model `_embed`), then the decoder
    layers. tests/test_grad_accum_offload.py checks this against a recorded forward."""
    vision_blocks, text_blocks = blocks_of(model)
    return [model.model.language_model.embed_tokens, *vision_blocks, *text_blocks]


def _set_prefetch(forward: list[nn.Module], backward_chains: list[list[nn.Module]], opts: FSDPOptions) -> None:
    """Explicit prefetch: each module all-gathers the next `forward_prefetch` modules of `forward` (the
    execution order) in forward, and the previous `backward_prefetch` of its chain in backward (0 keeps
    FSDP2's default of one implicit prefetch). Backward runs each chain in reverse and only where gradients
    flow: the vision tower is its own branch (no backward when it is frozen), so it is a chain of its own."""
    if opts.forward_prefetch > 0:
        for i, module in enumerate(forward):
            nxt = forward[i + 1 : i + 1 + opts.forward_prefetch]
            if nxt:
                module.set_modules_to_forward_prefetch(nxt)
    if opts.backward_prefetch > 0:
        for chain in backward_chains:
            for i, module in enumerate(chain):
                prev = chain[max(0, i - opts.backward_prefetch) : i][::-1]
                if prev:
                    module.set_modules_to_backward_prefetch(prev)


def materialize(model: nn.Module, device: torch.device, cpu_offload: bool = False) -> nn.Module:
    """Allocate a meta-device (possibly sharded) model on `device`; values are garbage until loaded or
    initialised (`model.init_weights`). With CPU offload the (sharded) parameters are allocated in host
    memory and only the buffers, which FSDP does not manage, on `device`."""
    if not cpu_offload:
        model.to_empty(device=device)
        return model
    model.to_empty(device="cpu")
    for module in model.modules():
        for name, buf in module.named_buffers(recurse=False):
            module._buffers[name] = buf.to(device)
    return model


def unshard_lm_head(model: nn.Module) -> torch.Tensor:
    """The full lm-head weight [V, H] for a loss computed outside the head's forward."""
    head = model.lm_head
    if isinstance(head, FSDPModule):
        head.unshard()
    return head.weight


def set_gradient_sync(model: nn.Module, *, last_micro_batch: bool) -> None:
    """Gradient reduction for the next micro-batch of a grad-accum window: the reduce-scatter always runs
    (sharded gradients accumulate, never unsharded ones); under HSDP the all-reduce across replicas runs
    only on the window's last micro-batch. So every FSDP unit with trainable parameters must get a gradient
    in every micro-batch (the trainer runs the vision tower on every rank and micro-batch), or under HSDP
    its summed reduce-scatter output would wait for an all-reduce that never comes."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(True)
        model.set_requires_all_reduce(last_micro_batch)
