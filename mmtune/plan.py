"""`mmtune plan`: per-GPU memory of a GLM-V finetune under FSDP2, before spending GPU hours (any
architecture of mmtune.models: GLM-4.5V / GLM-4.6V MoE, GLM-4.1V / GLM-4.6V-Flash dense).

What mmtune's FSDP2 stores (mmtune/distributed/parallelize.py):
- The model is built on the meta device and materialised in fp32; `fully_shard` keeps each rank's 1/N
  shard of every parameter in fp32 (the "master" weights). With the fsdp2 yaml's `param_dtype: bf16`
  each block's parameters are all-gathered into a bf16 copy for its forward/backward and freed again
  (reshard_after_forward); gradients come back in bf16, are reduce-scattered in `reduce_dtype` (fp32)
  and stored as fp32 shards.
- AdamW keeps two fp32 moments (m, v) per trainable parameter, sharded like the parameter.
- Frozen modules (model.json `freeze: true`) hold sharded fp32 parameters only: no gradient, no
  optimizer state, and (nothing upstream of them trains) no saved activations.
- Gradient accumulation (G micro-batches per step): every micro-batch's backward reduce-scatters its
  gradients, so between micro-batches only the fp32 gradient shards persist — the same bytes as the
  gradients row. It costs no memory beyond that (and saves the activations of the micro-batches it
  replaces) but G reduce-scatters of the gradient per step instead of one: that is its price, and the
  plan states it. (Syncing only on the last micro-batch would keep every trainable parameter's UNSHARDED
  fp32 gradient for the whole window: 4 B x trainable per GPU, ~420 GB for GLM-4.5V; mmtune never does.)

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

With LoRA (`--lora-r`, train/lora.py) the base is frozen and stored in the compute dtype; only the A adapter
parameters train (fp32 shards, gradients and AdamW state):
  static     = c B * (base parameters) / N + (4 + 4 + 8) B * A / N
  transient  = the blocks in flight in the compute dtype (base + adapters), one block's adapter gradients;
               the lm head is frozen (no gradient)
  activations: as full finetuning of the towers that carry adapters (backward runs through every layer
               with an adapter; each adapter also saves its [tokens, r] intermediate, counted).

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

from mmtune.config_files import DTYPE_NAMES
from mmtune.models import architecture_for_config, presets
from mmtune.models import load_config as load_hf_config
from mmtune.models.glm4v_moe.config import VisionConfig
from mmtune.train.freeze import MODULES, module_of

PRESETS = {name: make for name, (_, make) in presets().items()}
GiB = 1024**3
_DTYPE_BYTES = {name: getattr(torch, attr).itemsize for name, attr in DTYPE_NAMES.items()}

def build_meta_model(config) -> torch.nn.Module:
    """mmtune's model of this config's architecture on the meta device: shapes only, no memory."""
    model_class = architecture_for_config(config).model_class
    with torch.device("meta"):
        return model_class(config)


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
def decoder_layer_bytes_per_token(t, layer_idx: int, act_bytes: int, kv_repeat: int = 1) -> float:
    """Bytes autograd saves for backward in one decoder layer, per token (no recompute).

    Attention: the input norm's input and output, q/k/v projections' outputs and their rotated
    copies, the attention output (saved by o_proj); with context parallelism the attention's own
    copies of k/v hold `kv_repeat` times the KV heads. MLP: the post-attention norm's input and output;
    dense layers the gate/up output and the activation; MoE layers the fp32 router input and scores,
    and for each of the top-k experts a token copy, gate/up output, activation and down output,
    plus the shared expert's gate/up output and activation. GLM-4.1V's two extra norms per layer
    (`norms_per_layer` 4) save their inputs: the attention and MLP outputs.
    """
    q = t.num_attention_heads * t.head_dim
    kv = t.num_key_value_heads * t.head_dim
    h = t.hidden_size
    attn = 2 * h + (q + 2 * kv) + (q + kv) + q + (2 * kv * (kv_repeat - 1)) + (getattr(t, "norms_per_layer", 2) - 2) * h
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
    adapters: AdapterCounts | None = None
    grad_accum_steps: int = 1
    trainable: int = 0  # trainable parameters
    context_parallel_size: int = 1
    ep: int = 1  # --expert-model-parallel-size
    comm: dict[int, dict[str, float]] = field(default_factory=dict)  # communication() by ep size: 1 and ep
    reduce_scatter_bytes: float = 0.0  # fp32 gradient bytes one GPU sends in one micro-batch's reduce-scatters

    @property
    def reduce_scatter_bytes_per_step(self) -> float:
        """Gradient bytes each GPU sends per optimizer step: one reduce-scatter per micro-batch."""
        return self.grad_accum_steps * self.reduce_scatter_bytes

    @property
    def total_bytes(self) -> float:
        return sum(self.rows.values())

    @property
    def fits(self) -> bool:
        return self.total_bytes <= 0.9 * self.gpu_mem_gib * GiB


@dataclass
class AdapterCounts:
    """LoRA adapters of a model (train/lora.apply_lora on the meta model): parameters per model.json module,
    the largest decoder layer's, and the most adapted Linear modules / expert banks of one decoder layer
    (their [tokens, r] outputs; no banks in a dense model)."""

    by_module: dict[str, int]
    largest_decoder_layer: int
    r: int
    linear_modules_per_layer: int
    expert_banks_per_layer: int

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


def count_adapters(config, lora, frozen: tuple[str, ...]) -> AdapterCounts:
    """Apply LoRA (a train.lora.LoRAConfig) to the meta model with the freeze flags `frozen` and count."""
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.lora import apply_lora

    model = build_meta_model(config)
    info = apply_lora(model, lora, FreezeSpec(**{m: m in frozen for m in MODULES}))
    by_module = {m: 0 for m in MODULES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_module[module_of(name)] += p.numel()
    layers = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in model.model.language_model.layers]
    prefix = "model.language_model.layers."
    kinds_by_layer: dict[str, list[str]] = {}  # layer index -> the kinds of its adapted modules
    for name, kind in info.modules.items():
        if name.startswith(prefix):
            kinds_by_layer.setdefault(name[len(prefix):].split(".")[0], []).append(kind)
    linear = max((k.count("linear") for k in kinds_by_layer.values()), default=0)
    banks = max((k.count("experts") for k in kinds_by_layer.values()), default=0)
    return AdapterCounts(by_module, max(layers, default=0), lora.r, linear, banks)


def estimate(config, *, gpus: int = 1, gpu_mem_gib: float = 80.0, seq_length: int = 4096,
             micro_batch_size: int = 1, recompute: str = "full", compute_dtype: str = "bf16",
             frozen: tuple[str, ...] = ("vision_encoder", "vision_projector"), image_patches: int | None = None,
             loss_chunk_size: int = 1024, forward_prefetch: int = 1, fused_adamw: bool = True,
             grad_accum_steps: int = 1, config_name: str = "model", params: ParamCounts | None = None,
             adapters: AdapterCounts | None = None, context_parallel_size: int = 1, ep: int = 1) -> Plan:
    """Per-GPU memory of one training step under FSDP2 sharding over `gpus` ranks (see module docstring).
    `grad_accum_steps`: micro-batches per optimizer step (memory as one micro-batch; the gradient shards
    persist between them, counted in the gradients row).

    `image_patches`: vision patches per micro-batch (default: one image per sample of the recipe's
    image_max_pixels 262144, i.e. 512x512 -> 36x36 patches, or of the config's image_size if smaller). `frozen`: model.json modules with freeze true.
    `context_parallel_size`: GPUs that split each sequence (Ulysses; S/cp tokens per GPU).
    """
    if gpus < 1 or micro_batch_size < 1 or seq_length < 1 or grad_accum_steps < 1:
        raise ValueError("--gpus, --micro-batch-size, --seq-length and the grad-accum steps must be >= 1")
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

    ParallelDims(gpus, cp=cp, ep=ep).check_model(num_experts=architecture_for_config(config).num_experts(config))
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
    if adapters is not None:  # LoRA: frozen base in the compute dtype, fp32 adapters train
        trainable = adapters.total
        rows[f"base parameters (frozen, {compute_dtype} shards)"] = c * params.total / n
        rows["adapters (fp32 shards)"] = 4.0 * trainable / n
    else:
        rows["parameters (fp32 shards)"] = 4.0 * params.total / n
    rows["gradients (fp32 shards)"] = 4.0 * trainable / n  # also all a grad-accum window keeps between micro-batches
    rows["AdamW m+v (fp32 shards)"] = 8.0 * trainable / n

    # transient FSDP buffers: all-gathered block params (current + prefetched) in the compute dtype; in
    # backward one block's unsharded gradient (compute dtype, plus an fp32 copy for the reduce-scatter when
    # the compute dtype is lower); the lm head stays gathered from forward to backward (and its gradient).
    # with EP a MoE layer gathers only its E/ep experts (over the efsdp ranks) next to its dense part
    layer = params.largest_decoder_layer - params.largest_layer_experts * (1 - 1 / ep)
    blk = max(layer, params.largest_vision_block)
    grad_copy = c + (4 if c < 4 else 0)
    if adapters is not None:
        blk_grad, head_grad = adapters.largest_decoder_layer, 0  # only adapters have gradients
        blk += adapters.largest_decoder_layer
    else:
        blk_grad, head_grad = blk, (params.lm_head if "text_decoder" not in frozen else 0)
    transient = (1 + max(1, forward_prefetch)) * blk * c + blk_grad * grad_copy
    transient += params.lm_head * c + head_grad * grad_copy
    transient += params.root * c
    if n == 1 and c == 4:  # nothing to gather: fully_shard over one rank still all-gathers into new buffers
        pass
    rows["FSDP all-gather / reduce-scatter buffers"] = transient

    # activations of one micro-batch. Without recompute every layer's saved tensors are alive when the
    # loss runs; with full recompute only each layer's input is kept, and in backward one layer at a time
    # is recomputed -- after the loss's own tensors are gone -- so the peak is the larger of the two.
    per_layer = [decoder_layer_bytes_per_token(t, i, c, kv_repeat) for i in range(t.num_hidden_layers)]
    if adapters is not None:  # each adapter saves its [tokens, r] intermediate (per routed slot for experts)
        routed = 2 * adapters.expert_banks_per_layer * t.num_experts_per_tok if adapters.expert_banks_per_layer else 0
        extra = c * adapters.r * (adapters.linear_modules_per_layer + routed)
        per_layer = [b + extra for b in per_layer]
    if loss_chunk_size <= 0:  # plain: fp32 logits, log-softmax and their gradient over all tokens
        loss_act = tokens * t.vocab_size * 4.0 * 3
    else:  # chunked (train/loss.py): one fp32 [chunk, V] buffer, plus its copy in a narrower compute dtype
        loss_act = min(loss_chunk_size, tokens) * t.vocab_size * (4.0 + (c if c < 4 else 0))
    final = tokens * t.hidden_size * (c + 4)  # final norm output (kept for the loss) + its fp32 input
    # cp: the token embeddings, the image features merged into them and the merged result of the whole
    # sequence exist on every GPU before the split (at most S image tokens)
    cp_embed = 3.0 * micro_batch_size * seq_length * t.hidden_size * c if cp > 1 else 0.0
    text_trains = "text_decoder" not in frozen and (adapters is None or adapters.by_module["text_decoder"] > 0)
    if not text_trains:
        saved, working = final, max(loss_act, cp_embed)
    elif recompute == "none":
        saved, working = tokens * sum(per_layer) + final, max(loss_act, cp_embed)
    else:
        saved = tokens * t.num_hidden_layers * t.hidden_size * c + final
        working = max(loss_act, tokens * max(per_layer), cp_embed)
    rows["activations: decoder (saved for backward)"] = saved
    vision_trains = "vision_encoder" not in frozen and (adapters is None or adapters.by_module["vision_encoder"] > 0)
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
                image_patches, params, sorted(frozen), rows, notes, adapters, grad_accum_steps=grad_accum_steps,
                trainable=trainable, context_parallel_size=cp, ep=ep)
    for e in sorted({1, ep}):
        plan.comm[e] = communication(config, params, gpus=gpus, ep=e, tokens=tokens, compute_dtype=compute_dtype,
                                     recompute=recompute, frozen=frozen)
    # one reduce-scatter of the fp32 gradients per micro-batch: the dense ones over all GPUs, the experts'
    # over their efsdp ranks (communication())
    if adapters is not None:  # LoRA: only the fp32 adapters have gradients, all reduce-scattered over all GPUs
        plan.reduce_scatter_bytes = 4.0 * trainable * (gpus - 1) / gpus
    else:
        trainable_experts = params.experts if "text_decoder" not in frozen else 0
        plan.reduce_scatter_bytes = (4.0 * (trainable - trainable_experts) * (gpus - 1) / gpus
                                     + plan.comm[ep]["experts reduce-scatter (per micro-batch)"])
    if ep > 1:
        plan.notes.append("EP: the activation rows assume balanced routing; each rank's experts process the tokens "
                          "routed to them, so a layer whose busiest rank gets r x the mean load needs about r x its "
                          "expert activations there (metrics.jsonl logs the load max/mean per step)")
    fewer_rows = None
    if micro_batch_size > 1 and not plan.fits:
        # what grad accumulation would really give: micro-batch 1, the same global batch
        fewer_rows = estimate(config, gpus=gpus, gpu_mem_gib=gpu_mem_gib, seq_length=seq_length, micro_batch_size=1,
                              recompute=recompute, compute_dtype=compute_dtype, frozen=frozen,
                              image_patches=None if image_patches is None else max(1, image_patches // micro_batch_size),
                              loss_chunk_size=loss_chunk_size, forward_prefetch=forward_prefetch,
                              fused_adamw=fused_adamw, grad_accum_steps=grad_accum_steps * micro_batch_size,
                              config_name=config_name, params=params, adapters=adapters, context_parallel_size=cp,
                              ep=ep)
    plan.notes.extend(_advice(plan, fewer_rows))
    return plan


def communication(config, params: ParamCounts, *, gpus: int, ep: int, tokens: int,
                  compute_dtype: str = "bf16", recompute: str = "full", reduce_bytes: int = 4,
                  frozen: tuple[str, ...] = ()) -> dict[str, float]:
    """Bytes one GPU sends for the routed experts (see the module docstring): per micro-batch of `tokens`
    tokens their all-gathers (forward + backward), with ep > 1 the token all-to-all, and the reduce-scatter
    of their gradients (`reduce_bytes` per value; every micro-batch reduce-scatters, see grad accumulation)."""
    t = config.text
    c = _DTYPE_BYTES[compute_dtype]
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    efsdp = gpus // ep
    local = params.experts / ep  # expert parameters one ep rank owns (sharded over its efsdp ranks)
    ring = (efsdp - 1) / efsdp
    backward = any(m not in frozen for m in MODULES)  # something trains: backward runs through the decoder
    out = {"experts all-gather (per micro-batch)": local * c * ring * (1 + backward),
           "token all-to-all (per micro-batch)": 0.0,
           "experts reduce-scatter (per micro-batch)": local * reduce_bytes * ring if "text_decoder" not in frozen else 0.0}
    if ep > 1:
        rows = tokens * t.num_experts_per_tok * (ep - 1) / ep  # rows leaving this GPU in one dispatch
        row = 2 * t.hidden_size * c + 4  # the row there and its output back, plus its fp32 routing weight
        passes = 1 + (backward and recompute == "full") + backward  # forward, recomputed forward, backward
        out["token all-to-all (per micro-batch)"] = moe_layers * rows * row * passes
    return out


def _human(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 1024**2:.1f} MiB"


def _grad_accum_note(plan: Plan) -> str:
    g = plan.grad_accum_steps
    return (f"grad accumulation x{g}: gradients stay sharded between micro-batches (the gradients row); "
            f"{g} reduce-scatter{'s' if g > 1 else ''} of the fp32 gradient per step, "
            f"{_human(plan.reduce_scatter_bytes_per_step)} sent per GPU")


def _advice(plan: Plan, fewer_rows: Plan | None = None) -> list[str]:
    """What the plan says: fits or not, and what to change. `fewer_rows`: the same step as micro-batch 1 with
    proportionally more grad accumulation (estimated), when the micro-batch is larger than 1."""
    budget = 0.9 * plan.gpu_mem_gib * GiB
    total = plan.total_bytes
    accum = [_grad_accum_note(plan)] if plan.grad_accum_steps > 1 else []
    if total <= budget:
        return accum + [f"fits: {_human(total)} of {plan.gpu_mem_gib:g} GiB (10% kept for the allocator, CUDA, NCCL)"]
    out = accum + [f"does NOT fit: {total / GiB:.1f} GiB > {budget / GiB:.1f} GiB usable of {plan.gpu_mem_gib:g} GiB"]
    r = plan.rows
    static = sum(b for k, b in r.items() if "shards" in k)
    other = total - static
    if other < budget:
        need = plan.gpus * static / (budget - other)
        out.append(f"shard over more GPUs: about {int(need) + 1} GPUs make the sharded state fit "
                   f"(--gpus; the recipe uses 8 nodes x 16)")
    act = sum(b for k, b in r.items() if k.startswith("activations"))
    if plan.recompute == "none":
        out.append("turn on activation recompute (--recompute-granularity full) to keep one layer's activations")
    if fewer_rows is not None:
        verdict = "fits" if fewer_rows.fits else "still does not fit on its own"
        out.append(f"--micro-batch-size 1 with grad accumulation x{fewer_rows.grad_accum_steps} keeps the global "
                   f"batch: {_human(fewer_rows.total_bytes)} per GPU ({verdict}; saves "
                   f"{_human(total - fewer_rows.total_bytes)} of activations, costs "
                   f"{_human(fewer_rows.reduce_scatter_bytes_per_step - plan.reduce_scatter_bytes_per_step)} more "
                   "reduce-scatter traffic per GPU per step)")
    elif act > 0.3 * total:
        out.append("lower --seq-length: one sample's activations are a large share, and at micro-batch 1 more "
                   "accumulation steps cannot lower them")
    if plan.micro_batch_size > 1 or act > 0.3 * total:
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
        f"recompute {plan.recompute}, compute {plan.compute_dtype}, grad-accum {plan.grad_accum_steps}",
        f"parameters: {p.total:,} total (meta-device model)",
    ]
    if plan.context_parallel_size > 1:
        cp = plan.context_parallel_size
        lines.insert(1, f"context parallel {cp} (Ulysses): {-(-plan.seq_length // cp)} tokens of each sequence "
                        f"per GPU; data parallel {plan.gpus // cp}")
    for m, cnt in p.by_module.items():
        state = "frozen" if m in plan.frozen else "trains"
        if plan.adapters is not None and m not in plan.frozen:
            state = f"frozen base + {plan.adapters.by_module[m]:,} LoRA (r={plan.adapters.r}) parameters train"
        lines.append(f"  {m:<17} {cnt:>16,}  {state}")
    lines.append(f"  largest decoder layer {p.largest_decoder_layer:,}; lm head {p.lm_head:,}")
    unit, scale = ("GiB", GiB) if plan.total_bytes >= GiB else ("MiB", 1024**2)
    lines.append("per GPU:")
    width = max(map(len, plan.rows))
    for k, b in plan.rows.items():
        lines.append(f"  {k:<{width}}  {b / scale:10.2f} {unit}")
    lines.append(f"  {'total':<{width}}  {plan.total_bytes / scale:10.2f} {unit}")
    if plan.comm and plan.params.experts:  # a dense model has no routed experts to move
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


def measure_training_step(config, *, micro_batch_size: int, seq_length: int,
                          recompute: str = "none", frozen: tuple[str, ...] = (), images_per_sample: int = 1,
                          seed: int = 0) -> dict[str, int]:
    """Measured peak bytes of one fp32 training step on the CPU: forward, cross-entropy over all logits,
    backward, AdamW step (state created in it). Returns {"params", "peak_step", "peak"} where peak =
    parameter bytes + the peak of everything the step allocates (see `_LiveTensorBytes`). One process,
    no sharding (the FSDP2 layout over one rank holds the same tensors)."""
    from mmtune.distributed.parallelize import apply_activation_checkpointing

    torch.manual_seed(seed)
    model = architecture_for_config(config).model_class(config)
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


def load_config(model: str) -> tuple[object, str]:
    """(config, name) of a preset or an HF model dir (its architecture from config.json's model_type)."""
    if model in PRESETS:
        return PRESETS[model](), model
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: neither a preset ({', '.join(PRESETS)}) nor an HF model dir")
    return load_hf_config(path)[1], str(path)


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
        description="Per-GPU memory of finetuning a GLM-V model (GLM-4.5V / GLM-4.6V MoE, GLM-4.1V / "
                    "GLM-4.6V-Flash dense) under FSDP2: sharded fp32 "
                    "parameters, gradients and AdamW state, all-gather buffers and activations; says whether "
                    "it fits and what to change.",
    )
    ap.add_argument("--model", required=True,
                    help=f"an HF model dir (its config.json) or a preset: {', '.join(PRESETS)}")
    ap.add_argument("--gpus", type=int, required=True, help="GPUs that FSDP2 shards over (nodes x GPUs per node)")
    ap.add_argument("--gpu-mem", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--seq-length", type=int, default=4096, help="tokens per sample (--seq-length of train)")
    ap.add_argument("--micro-batch-size", type=int, default=1, help="samples per GPU per forward")
    ap.add_argument("--global-batch-size", type=int, default=None,
                    help="samples per optimizer step over all GPUs (train's flag); grad accumulation = GBS / "
                         "(micro-batch x GPUs / context-parallel size), must divide (default: no accumulation)")
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
    ap.add_argument("--lora-r", type=int, default=None,
                    help="plan LoRA of this rank (train's --lora-r): frozen base in the compute dtype, fp32 adapters "
                         "train (in the modules the freeze flags leave trainable)")
    ap.add_argument("--lora-target-modules", nargs="+", default=None,
                    help="LoRA targets as for train (default all-linear: every Linear and the routed experts)")
    ap.add_argument("--expert-model-parallel-size", type=int, default=1,
                    help="expert parallelism: GPUs that split each MoE layer's experts (must divide --gpus and the "
                         "experts); shows the all-gather buffers it saves and the communication side by side with "
                         "FSDP only (default 1)")
    args = ap.parse_args(argv)
    config, name = load_config(args.model)
    if args.context_parallel_size < 1 or args.gpus % args.context_parallel_size:
        ap.error(f"--context-parallel-size {args.context_parallel_size} must be >= 1 and divide --gpus {args.gpus}")
    # the data-parallel ranks read different samples: GPUs / cp (the cp ranks of a group share one sample)
    per_step = args.micro_batch_size * args.gpus // args.context_parallel_size
    gbs = args.global_batch_size or per_step
    if gbs % per_step:
        ap.error(f"--global-batch-size {gbs} must be a multiple of --micro-batch-size x data-parallel GPUs "
                 f"(--gpus / --context-parallel-size) = {per_step}")
    if args.freeze is not None:
        frozen = tuple(s for s in args.freeze.split(",") if s)
    elif args.mm_model:
        frozen = frozen_from_model_json(args.mm_model)
    else:
        frozen = ("vision_encoder", "vision_projector")
    try:
        adapters = None
        if args.lora_r is not None or args.lora_target_modules is not None:
            from mmtune.train.lora import DEFAULT_TARGETS, LoRAConfig

            if args.lora_r is None:
                raise ValueError("--lora-target-modules needs --lora-r")
            lora = LoRAConfig(r=args.lora_r, targets=tuple(args.lora_target_modules or DEFAULT_TARGETS))
            adapters = count_adapters(config, lora, frozen)
        plan = estimate(config, gpus=args.gpus, gpu_mem_gib=args.gpu_mem, seq_length=args.seq_length,
                        micro_batch_size=args.micro_batch_size, recompute=args.recompute,
                        compute_dtype=args.compute_dtype, frozen=frozen, image_patches=args.image_patches,
                        loss_chunk_size=args.loss_chunk_size, forward_prefetch=args.forward_prefetch,
                        grad_accum_steps=gbs // per_step, config_name=name, adapters=adapters,
                        context_parallel_size=args.context_parallel_size, ep=args.expert_model_parallel_size)
    except ValueError as e:
        print(f"mmtune plan: error: {e}", file=sys.stderr)
        return 2
    print(format_plan(plan))
    return 0
