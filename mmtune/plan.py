"""`mmtune plan`: per-GPU memory of a GLM-4.5V finetune under FSDP2, before spending GPU hours.

What mmtune's FSDP2 stores (mmtune/distributed/parallelize.py):
- The model is built on the meta device and materialised in fp32; `fully_shard` keeps each rank's 1/N
  shard of every parameter in fp32 (the "master" weights). With the fsdp2 yaml's `param_dtype: bf16`
  each block's parameters are all-gathered into a bf16 copy for its forward/backward and freed again
  (reshard_after_forward); gradients come back in bf16, are reduce-scattered in `reduce_dtype` (fp32)
  and stored as fp32 shards.
- AdamW keeps two fp32 moments (m, v) per trainable parameter, sharded like the parameter.
- Frozen modules (model.json `freeze: true`) hold sharded fp32 parameters only: no gradient, no
  optimizer state, and (nothing upstream of them trains) no saved activations.

So per GPU, for P trainable and F frozen parameters over N GPUs:
  static     = (4 + 4 + 8) B * P / N + 4 B * F / N
  transient  = unsharded compute-dtype copies of the blocks in flight (current + prefetched, params and
               gradients), the lm head kept gathered from forward to backward, the root's parameters
  activations (per micro-batch) = saved tensors of every decoder layer (recompute none) or only each
               layer's input plus one layer's working set (recompute full), the vision tower when it
               trains, and the chunked loss's logits chunk.
The activation terms count the tensors autograd saves for backward, per token and layer, in the
compute dtype (see `decoder_layer_bytes_per_token`). Allocator fragmentation, the CUDA context
(~0.5-1 GiB) and NCCL buffers are not in the estimate: keep ~10% headroom.

Context parallelism (`--context-parallel-size cp`, distributed/context_parallel.py) divides the tokens
of each sequence: the decoder's activations are those of S/cp tokens per GPU (key/value heads repeated
when cp exceeds them), the vision tower encodes about 1/cp of the images (whole images: never less than
one), and at the start of each forward every GPU briefly holds the whole sequence's embeddings and
image features before keeping its share. Parameters, gradients and optimizer state are sharded over
all GPUs as before (the cp ranks are FSDP ranks).

Expert parallelism (`--expert-model-parallel-size EP`, docs/INTERNALS.md "Expert parallelism"): the
sharded state is the same (the experts are still split over all GPUs: EP groups x efsdp), but a MoE
layer all-gathers only its own E/EP experts, so the transient buffers shrink, and the communication changes:
  without EP  every GPU all-gathers every expert in forward and again in backward (reshard after forward),
              and reduce-scatters their gradients;
  with EP     each GPU all-gathers only its E/EP experts over the efsdp = GPUs/EP ranks, and sends its
              tokens' rows to the experts' GPUs and back (all-to-all): forward, the recomputed forward
              (recompute full), and backward.
`communication()` counts the bytes each GPU sends per micro-batch (ring collectives: (n-1)/n of the data;
all-to-all: the (EP-1)/EP of the rows that are remote under balanced routing).

Parameter counts come from the model itself, built on the meta device (no memory is allocated).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mmtune.models.glm4v_moe.config import Glm4vMoeConfig, TextConfig, VisionConfig, glm45v_config, tiny_config
from mmtune.train.freeze import MODULES, module_of

PRESETS = {"glm4.5v": glm45v_config, "tiny": tiny_config}
GiB = 1024**3
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

def build_meta_model(config: Glm4vMoeConfig) -> torch.nn.Module:
    """mmtune's GLM-4.5V model on the meta device: shapes only, no memory."""
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration

    with torch.device("meta"):
        return Glm4vMoeForConditionalGeneration(config)


@dataclass
class ParamCounts:
    """Parameter counts of one model, per model.json module, plus the largest FSDP unit of each tower."""

    by_module: dict[str, int]
    largest_decoder_layer: int
    largest_vision_block: int
    lm_head: int
    embed: int
    root: int  # parameters of no block: patch embed, merger, final norms (gathered for the whole step)
    experts: int = 0  # routed-expert parameters (mlp.experts.*) of all MoE layers
    largest_layer_experts: int = 0  # the routed-expert parameters of the largest decoder layer

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


def count_params(model: torch.nn.Module) -> ParamCounts:
    by_module = {m: 0 for m in MODULES}
    for name, p in model.named_parameters():
        by_module[module_of(name)] += p.numel()
    inner = model.model
    layers = [sum(p.numel() for p in layer.parameters()) for layer in inner.language_model.layers]
    layer_experts = [sum(p.numel() for n, p in layer.named_parameters() if n.startswith("mlp.experts."))
                     for layer in inner.language_model.layers]
    blocks = [sum(p.numel() for p in b.parameters()) for b in inner.visual.blocks] or [0]
    lm_head = model.lm_head.weight.numel()
    embed = inner.language_model.embed_tokens.weight.numel()
    total = sum(by_module.values())
    root = total - sum(layers) - sum(blocks) - lm_head - embed
    largest = max(range(len(layers)), key=layers.__getitem__)
    return ParamCounts(by_module, max(layers), max(blocks), lm_head, embed, root, sum(layer_experts),
                       layer_experts[largest])


# ---- activations ---------------------------------------------------------------------------------
def decoder_layer_bytes_per_token(t: TextConfig, layer_idx: int, act_bytes: int, kv_repeat: int = 1) -> float:
    """Bytes autograd saves for backward in one decoder layer, per token (no recompute).

    Attention: the input norm's input and output, q/k/v projections' outputs and their rotated
    copies, the attention output (saved by o_proj); with context parallelism the attention's own
    copies of k/v hold `kv_repeat` times the KV heads. MLP: the post-attention norm's input and output;
    dense layers the gate/up output and the activation; MoE layers the fp32 router input and scores,
    and for each of the top-k experts a token copy, gate/up output, activation and down output,
    plus the shared expert's gate/up output and activation.
    """
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    h = t.hidden_size
    attn = 2 * h + (q + 2 * kv) + (q + kv) + q + (2 * kv * (kv_repeat - 1))
    if t.is_moe_layer(layer_idx):
        k, i_m = t.num_experts_per_tok, t.moe_intermediate_size
        i_s = i_m * t.n_shared_experts
        mlp = 2 * h + k * (2 * h + 3 * i_m) + 3 * i_s
        router = 4 * (h + 3 * t.n_routed_experts)  # fp32 input, logits, scores, biased scores
    else:
        mlp = 2 * h + 3 * t.intermediate_size
        router = 0
    return act_bytes * (attn + mlp) + router


def vision_block_bytes_per_patch(v: VisionConfig, act_bytes: int) -> float:
    """Bytes one vision block saves per patch: norms, qkv, rotated q/k, attention output, SwiGLU MLP."""
    h = v.hidden_size
    return act_bytes * (2 * h + 3 * h + 2 * h + h + 2 * h + 3 * v.intermediate_size)


@dataclass
class Plan:
    config_name: str
    gpus: int
    gpu_mem_gib: float
    seq_length: int
    micro_batch_size: int
    recompute: str
    compute_dtype: str
    image_patches: int
    params: ParamCounts
    frozen: list[str]
    rows: dict[str, float] = field(default_factory=dict)  # bytes per GPU
    notes: list[str] = field(default_factory=list)
    context_parallel_size: int = 1
    ep: int = 1  # --expert-model-parallel-size
    comm: dict[int, dict[str, float]] = field(default_factory=dict)  # communication() by ep size: 1 and ep

    @property
    def total_bytes(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= 0.9 * self.gpu_mem_gib * GiB


def estimate(config: Glm4vMoeConfig, *, gpus: int = 1, gpu_mem_gib: float = 80.0, seq_length: int = 4096,
             micro_batch_size: int = 1, recompute: str = "full", compute_dtype: str = "bf16",
             frozen: tuple[str, ...] = ("vision_encoder", "vision_projector"), image_patches: int | None = None,
             loss_chunk_size: int = 1024, forward_prefetch: int = 1, fused_adamw: bool = True,
             config_name: str = "model", params: ParamCounts | None = None, context_parallel_size: int = 1,
             ep: int = 1) -> Plan:
    """Per-GPU memory of one training step under FSDP2 sharding over `gpus` ranks (see module docstring).

    `image_patches`: vision patches per micro-batch (default: one image per sample of the recipe's
    image_max_pixels 262144, i.e. 512x512 -> 36x36 patches, or of the config's image_size if smaller). `frozen`: model.json modules with freeze true.
    `context_parallel_size`: GPUs that split each sequence (Ulysses; S/cp tokens per GPU).
    """
    if gpus < 1 or micro_batch_size < 1 or seq_length < 1:
        raise ValueError("--gpus, --micro-batch-size and --seq-length must be >= 1")
    cp = context_parallel_size
    if cp < 1 or gpus % cp:
        raise ValueError(f"--context-parallel-size {cp} must be >= 1 and divide --gpus {gpus}")
    if config.text.num_attention_heads % cp:
        raise ValueError(f"--context-parallel-size {cp} must divide the model's num_attention_heads "
                         f"{config.text.num_attention_heads}")
    if recompute not in ("full", "none"):
        raise ValueError(f"--recompute {recompute!r}: use 'full' or 'none'")
    if compute_dtype not in _DTYPE_BYTES:
        raise ValueError(f"--compute-dtype {compute_dtype!r}: use one of {sorted(_DTYPE_BYTES)}")
    unknown = set(frozen) - set(MODULES)
    if unknown:
        raise ValueError(f"--freeze {sorted(unknown)}: modules are {sorted(MODULES)}")
    from mmtune.distributed.parallel_dims import ParallelDims

    ParallelDims(gpus, cp=cp, ep=ep).check_model(num_experts=config.text.n_routed_experts)  # errors name the numbers
    params = params or count_params(build_meta_model(config))
    c = _DTYPE_BYTES[compute_dtype]
    t, v = config.text, config.vision
    n = gpus
    trainable = sum(cnt for m, cnt in params.by_module.items() if m not in frozen)
    pixels = min(512, v.image_size) if v.image_size < 336 else 512  # tiny models: their own image size
    side = pixels // v.patch_size // v.spatial_merge_size * v.spatial_merge_size
    if image_patches is None:
        image_patches = micro_batch_size * side * side
    # context parallelism: each GPU keeps S/cp tokens (S padded to a multiple of cp) and encodes whole
    # images, about 1/cp of them (a rank can not hold less than one image of the default size)
    tokens = micro_batch_size * -(-seq_length // cp)
    rank_patches = image_patches if cp == 1 else max(-(-image_patches // cp), min(image_patches, side * side))
    G = t.num_key_value_heads
    kv_repeat = 1 if G % cp == 0 else (cp // G if cp % G == 0 else t.num_attention_heads // G)
    rows: dict[str, float] = {}
    rows["parameters (fp32 shards)"] = 4.0 * params.total / n
    rows["gradients (fp32 shards)"] = 4.0 * trainable / n
    rows["AdamW m+v (fp32 shards)"] = 8.0 * trainable / n

    # transient FSDP buffers: all-gathered block params (current + prefetched) in the compute dtype; in
    # backward one block's unsharded gradient (compute dtype, plus an fp32 copy for the reduce-scatter when
    # the compute dtype is lower); the lm head stays gathered from forward to backward (and its gradient).
    # with EP a MoE layer gathers only its E/ep experts (over the efsdp ranks) next to its dense part
    layer = params.largest_decoder_layer - params.largest_layer_experts * (1 - 1 / ep)
    blk = max(layer, params.largest_vision_block)
    grad_copy = c + (4 if c < 4 else 0)
    transient = (1 + max(1, forward_prefetch)) * blk * c + blk * grad_copy
    transient += params.lm_head * c + (params.lm_head * grad_copy if "text_decoder" not in frozen else 0)
    transient += params.root * c
    if n == 1 and c == 4:  # nothing to gather: fully_shard over one rank still all-gathers into new buffers
        pass
    rows["FSDP all-gather / reduce-scatter buffers"] = transient

    # activations of one micro-batch. Without recompute every layer's saved tensors are alive when the
    # loss runs; with full recompute only each layer's input is kept, and in backward one layer at a time
    # is recomputed -- after the loss's own tensors are gone -- so the peak is the larger of the two.
    per_layer = [decoder_layer_bytes_per_token(t, i, c, kv_repeat) for i in range(t.num_hidden_layers)]
    chunk = tokens if loss_chunk_size <= 0 else min(loss_chunk_size, tokens)
    loss_act = chunk * t.vocab_size * 4.0 * 3  # fp32 logits, softmax, their gradient
    final = tokens * t.hidden_size * (c + 4)  # final norm output (kept for the loss) + its fp32 input
    # cp: the token embeddings, the image features merged into them and the merged result of the whole
    # sequence exist on every GPU before the split (at most S image tokens)
    cp_embed = 3.0 * micro_batch_size * seq_length * t.hidden_size * c if cp > 1 else 0.0
    text_trains = "text_decoder" not in frozen
    if not text_trains:
        saved, working = final, max(loss_act, cp_embed)
    elif recompute == "none":
        saved, working = tokens * sum(per_layer) + final, max(loss_act, cp_embed)
    else:
        saved = tokens * t.num_hidden_layers * t.hidden_size * c + final
        working = max(loss_act, tokens * max(per_layer), cp_embed)
    rows["activations: decoder (saved for backward)"] = saved
    vision_trains = "vision_encoder" not in frozen
    if vision_trains:
        pb = vision_block_bytes_per_patch(v, c)
        vision_act = rank_patches * (v.depth * pb if recompute == "none" else v.depth * v.hidden_size * c + pb)
    else:
        vision_act = rank_patches * v.hidden_size * c * 2.0  # the tower's output, before the merger
    rows["activations: vision"] = vision_act
    rows["activations: loss chunk / recomputed layer"] = working

    notes = []
    step_temp = 0.0 if fused_adamw else 2 * 4.0 * trainable / n  # foreach AdamW temporaries at the step
    fwd_bwd = sum(rows[k] for k in rows if k.startswith("activations") or k.startswith("FSDP"))
    if step_temp > fwd_bwd:
        rows["optimizer step temporaries (foreach AdamW)"] = step_temp - fwd_bwd
    plan = Plan(config_name, gpus, gpu_mem_gib, seq_length, micro_batch_size, recompute, compute_dtype,
                image_patches, params, sorted(frozen), rows, notes, context_parallel_size=cp, ep=ep)
    for e in sorted({1, ep}):
        plan.comm[e] = communication(config, params, gpus=gpus, ep=e, tokens=tokens, compute_dtype=compute_dtype,
                                     recompute=recompute, frozen=frozen)
    if ep > 1:
        plan.notes.append("EP: the activation rows assume balanced routing; each rank's experts process the tokens "
                          "routed to them, so a layer whose busiest rank gets r x the mean load needs about r x its "
                          "expert activations there (metrics.jsonl logs the load max/mean per step)")
    plan.notes.extend(_advice(plan))
    return plan


def communication(config: Glm4vMoeConfig, params: ParamCounts, *, gpus: int, ep: int, tokens: int,
                  compute_dtype: str = "bf16", recompute: str = "full", reduce_bytes: int = 4,
                  frozen: tuple[str, ...] = ()) -> dict[str, float]:
    """Bytes one GPU sends for the routed experts (see the module docstring): per micro-batch of `tokens`
    tokens their all-gathers (forward + backward) and, with ep > 1, the token all-to-all; per optimizer
    step the reduce-scatter of their gradients (`reduce_bytes` per value)."""
    t = config.text
    c = _DTYPE_BYTES[compute_dtype]
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    efsdp = gpus // ep
    local = params.experts / ep  # expert parameters one ep rank owns (sharded over its efsdp ranks)
    ring = (efsdp - 1) / efsdp
    backward = any(m not in frozen for m in MODULES)  # something trains: backward runs through the decoder
    out = {"experts all-gather (per micro-batch)": local * c * ring * (1 + backward),
           "token all-to-all (per micro-batch)": 0.0,
           "experts reduce-scatter (per step)": local * reduce_bytes * ring if "text_decoder" not in frozen else 0.0}
    if ep > 1:
        rows = tokens * t.num_experts_per_tok * (ep - 1) / ep  # rows leaving this GPU in one dispatch
        row = 2 * t.hidden_size * c + 4  # the row there and its output back, plus its fp32 routing weight
        passes = 1 + (backward and recompute == "full") + backward  # forward, recomputed forward, backward
        out["token all-to-all (per micro-batch)"] = moe_layers * rows * row * passes
    return out


def _human(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 1024**2:.1f} MiB"


def _advice(plan: Plan) -> list[str]:
    budget = 0.9 * plan.gpu_mem_gib * GiB
    total = plan.total_bytes
    if total <= budget:
        return [f"fits: {_human(total)} of {plan.gpu_mem_gib:g} GiB (10% kept for the allocator, CUDA, NCCL)"]
    out = [f"does NOT fit: {total / GiB:.1f} GiB > {budget / GiB:.1f} GiB usable of {plan.gpu_mem_gib:g} GiB"]
    r = plan.rows
    static = r["parameters (fp32 shards)"] + r["gradients (fp32 shards)"] + r["AdamW m+v (fp32 shards)"]
    other = total - static
    if other < budget:
        need = plan.gpus * static / (budget - other)
        out.append(f"shard over more GPUs: about {int(need) + 1} GPUs make the sharded state fit "
                   f"(--gpus; the recipe uses 8 nodes x 16)")
    act = sum(b for k, b in r.items() if k.startswith("activations"))
    if plan.recompute == "none":
        out.append("turn on activation recompute (--recompute-granularity full) to keep one layer's activations")
    if plan.micro_batch_size > 1 or act > 0.3 * total:
        out.append("lower --micro-batch-size / --seq-length (raise --global-batch-size via grad accumulation instead)")
        out.append("split each sequence over more GPUs (--context-parallel-size; S/cp tokens per GPU)")
    if "vision_encoder" not in plan.frozen:
        out.append("freeze the vision encoder (model.json image_encoder.vision_encoder.freeze true)")
    out.append("CPU offload (fsdp2 yaml offload_to_cpu: True) moves the sharded params, grads and AdamW state "
               "to host memory")
    return out


def format_plan(plan: Plan) -> str:
    p = plan.params
    lines = [
        f"memory plan: {plan.config_name}, FSDP2 over {plan.gpus} GPU(s) of {plan.gpu_mem_gib:g} GiB, "
        f"micro-batch {plan.micro_batch_size} x {plan.seq_length} tokens (+{plan.image_patches} vision patches), "
        f"recompute {plan.recompute}, compute {plan.compute_dtype}",
        f"parameters: {p.total:,} total (meta-device model)",
    ]
    if plan.context_parallel_size > 1:
        cp = plan.context_parallel_size
        lines.insert(1, f"context parallel {cp} (Ulysses): {-(-plan.seq_length // cp)} tokens of each sequence "
                        f"per GPU; data parallel {plan.gpus // cp}")
    for m, cnt in p.by_module.items():
        lines.append(f"  {m:<17} {cnt:>16,}  {'frozen' if m in plan.frozen else 'trains'}")
    lines.append(f"  largest decoder layer {p.largest_decoder_layer:,}; lm head {p.lm_head:,}")
    unit, scale = ("GiB", GiB) if plan.total_bytes >= GiB else ("MiB", 1024**2)
    lines.append("per GPU:")
    width = max(map(len, plan.rows))
    for k, b in plan.rows.items():
        lines.append(f"  {k:<{width}}  {b / scale:10.2f} {unit}")
    lines.append(f"  {'total':<{width}}  {plan.total_bytes / scale:10.2f} {unit}")
    if plan.comm:
        layouts = {e: ("FSDP only" if e == 1 else f"EP {e} x efsdp {plan.gpus // e}") for e in plan.comm}
        lines.append("routed-expert communication sent per GPU: " + " | ".join(layouts.values()))
        for key in [*next(iter(plan.comm.values())), "total of a step of one micro-batch"]:
            cells = [sum(c.values()) if key.startswith("total") else c[key] for c in plan.comm.values()]
            lines.append(f"  {key:<{width}}  " + " | ".join(f"{b / GiB:10.2f} GiB" for b in cells))
    lines += plan.notes
    return "\n".join(lines)


# ---- measuring on the CPU --------------------------------------------------------------------------
class _LiveTensorBytes:
    """Peak bytes of tensor storages alive at once, for everything run under it (a TorchDispatchMode that
    records each new output storage and, through a weakref finaliser, when it is freed). On the CPU this
    plays the role of torch.cuda.max_memory_allocated: it sees every tensor autograd saves, every
    gradient and optimizer state, and no allocator caching or Python overhead."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self.mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _record(self, out) -> None:
        import weakref

        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            # a DTensor has no storage of its own: its local tensor is recorded by the op that made it
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or is_traceable_wrapper_subclass(t):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def measure_training_step(config: Glm4vMoeConfig, *, micro_batch_size: int, seq_length: int,
                          recompute: str = "none", frozen: tuple[str, ...] = (), images_per_sample: int = 1,
                          seed: int = 0) -> dict[str, int]:
    """Measured peak bytes of one fp32 training step on the CPU: forward, cross-entropy over all logits,
    backward, AdamW step (state created in it). Returns {"params", "peak_step", "peak"} where peak =
    parameter bytes + the peak of everything the step allocates (see `_LiveTensorBytes`). One process,
    no sharding (the FSDP2 layout over one rank holds the same tensors)."""
    from mmtune.distributed.parallelize import apply_activation_checkpointing
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration

    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(config)
    model.init_weights(seed=seed)
    for name, p in model.named_parameters():
        p.requires_grad_(module_of(name) not in frozen)
    if recompute == "full":
        apply_activation_checkpointing(model, vision=True)
    v, t = config.vision, config.text
    m = v.spatial_merge_size
    grid = torch.tensor([[1, 2 * m, 2 * m]] * (micro_batch_size * images_per_sample))
    n_img_tokens = 4 * images_per_sample  # (2m * 2m) patches -> 4 tokens each
    gen = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(0, 400, (micro_batch_size, seq_length), generator=gen)
    ids_BS[:, 1:1 + n_img_tokens] = config.image_token_id
    pixels = torch.randn(int(grid.prod(-1).sum()), v.patch_dim, generator=gen)
    labels_BS = torch.randint(0, 400, (micro_batch_size, seq_length), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    tracker = _LiveTensorBytes()
    with tracker.mode:
        out = model(ids_BS, pixel_values=pixels, image_grid_thw=grid)
        loss = torch.nn.functional.cross_entropy(out.logits.float().view(-1, t.vocab_size), labels_BS.view(-1))
        del out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return {"params": params, "peak_step": tracker.peak, "peak": params + tracker.peak}


def load_config(model: str) -> tuple[Glm4vMoeConfig, str]:
    if model in PRESETS:
        return PRESETS[model](), model
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: neither a preset ({', '.join(PRESETS)}) nor an HF model dir")
    return Glm4vMoeConfig.from_pretrained(path), str(path)


def frozen_from_model_json(path: str | Path) -> tuple[str, ...]:
    """The modules a model.json (the recipe's format) freezes; defaults as the recipe's."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mm-model {path}: no such file")
    cfg = json.loads(path.read_text())
    enc = cfg.get("image_encoder", {})
    frozen = []
    if enc.get("vision_encoder", {}).get("freeze", True):
        frozen.append("vision_encoder")
    if enc.get("vision_projector", {}).get("freeze", True):
        frozen.append("vision_projector")
    if cfg.get("text_decoder", {}).get("freeze", False):
        frozen.append("text_decoder")
    return tuple(frozen)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtune plan",
        description="Per-GPU memory of finetuning a GLM-4.5V-architecture model under FSDP2: sharded fp32 "
                    "parameters, gradients and AdamW state, all-gather buffers and activations; says whether "
                    "it fits and what to change.",
    )
    ap.add_argument("--model", required=True,
                    help=f"an HF model dir (its config.json) or a preset: {', '.join(PRESETS)}")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs that FSDP2 shards over (nodes x GPUs per node)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--seq-length", type=int, default=4096, help="tokens per sample (--seq-length of train)")
    ap.add_argument("--micro-batch-size", type=int, default=1, help="samples per GPU per forward")
    ap.add_argument("--recompute", choices=["full", "none"], default="full",
                    help="activation recompute of every block (train's --recompute-granularity full) or none")
    ap.add_argument("--compute-dtype", choices=sorted(_DTYPE_BYTES), default="bf16",
                    help="fsdp2 yaml param_dtype: the dtype blocks compute in (bf16 on GPUs; fp32 on the CPU)")
    ap.add_argument("--mm-model", default=None,
                    help="model.json whose freeze flags decide what trains (default: the recipe's: vision "
                         "encoder and projector frozen, text decoder trains)")
    ap.add_argument("--freeze", default=None,
                    help="comma-separated modules to freeze, overriding --mm-model: "
                         f"{', '.join(MODULES)} (empty string: train everything)")
    ap.add_argument("--image-patches", type=int, default=None,
                    help="vision patches per micro-batch (default: one 512x512 image per sample, the recipe's "
                         "image_max_pixels; a model with a smaller vision image_size: one image of that size)")
    ap.add_argument("--loss-chunk-size", type=int, default=1024,
                    help="tokens per chunk of the chunked cross-entropy (0: whole logits at once)")
    ap.add_argument("--forward-prefetch", type=int, default=1, help="blocks all-gathered ahead (fsdp2 yaml)")
    ap.add_argument("--context-parallel-size", type=int, default=1,
                    help="GPUs that split each sequence (train's --context-parallel-size, Ulysses): each keeps "
                         "seq-length/N tokens; must divide --gpus and the attention heads (default 1)")
    ap.add_argument("--expert-model-parallel-size", type=int, default=1,
                    help="expert parallelism: GPUs that split each MoE layer's experts (must divide --gpus and the "
                         "experts); shows the all-gather buffers it saves and the communication side by side with "
                         "FSDP only (default 1)")
    args = ap.parse_args(argv)
    config, name = load_config(args.model)
    if args.freeze is not None:
        frozen = tuple(s for s in args.freeze.split(",") if s)
    elif args.mm_model:
        frozen = frozen_from_model_json(args.mm_model)
    else:
        frozen = ("vision_encoder", "vision_projector")
    try:
        plan = estimate(config, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, seq_length=args.seq_length,
                        micro_batch_size=args.micro_batch_size, recompute=args.recompute,
                        compute_dtype=args.compute_dtype, frozen=frozen, image_patches=args.image_patches,
                        loss_chunk_size=args.loss_chunk_size, forward_prefetch=args.forward_prefetch,
                        config_name=name, context_parallel_size=args.context_parallel_size,
                        ep=args.expert_model_parallel_size)
    except ValueError as e:
        print(f"mmtune plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0
