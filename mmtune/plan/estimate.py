"""Per-GPU memory of one training step under FSDP2 (`estimate`), and what it says (fits, or what to change).

What mmtune's FSDP2 stores (mmtune/distributed/parallelize.py):
- The model is built on the meta device and materialised in fp32; `fully_shard` keeps each rank's 1/N
  shard of every parameter in fp32 (the "master" weights). With the fsdp2 yaml's `param_dtype: bf16`
  each block's parameters are all-gathered into a bf16 copy for its forward/backward and freed again
  (reshard_after_forward); gradients come back in bf16, are reduce-scattered in `reduce_dtype` (fp32)
  and stored as fp32 shards.
- AdamW keeps two fp32 moments (m, v) per trainable parameter, sharded like the parameter. They exist from
  the first optimizer step on: the estimate is of a later step, which holds them throughout.
- Frozen modules (model.json `freeze: true`) hold sharded fp32 parameters only: no gradient, no
  optimizer state, and (nothing upstream of them trains) no saved activations.
- Gradients: the trainer sets them to None after each optimizer step, so a step's backward makes them layer
  by layer (the lm head's first, then each decoder layer's from the last down). Gradient accumulation (G
  micro-batches per step): every micro-batch's backward reduce-scatters its gradients, so between
  micro-batches only the fp32 gradient shards persist: from the second micro-batch on, every gradient shard
  is alive through its forward and backward. It costs no other memory (and saves the activations of the
  micro-batches it replaces) but G reduce-scatters of the gradient per step instead of one: that is its
  price, and the plan states it. (Syncing only on the last micro-batch would keep every trainable
  parameter's UNSHARDED fp32 gradient for the whole window: 4 B x trainable per GPU, ~420 GB for GLM-4.5V;
  mmtune never does.)

So per GPU, for P trainable and F frozen parameters over N GPUs, the rows (each part at its largest):
  resident   = (4 + 8) B * P / N + 4 B * F / N          parameters and AdamW m+v, the whole step
  gradients  = 4 B * P / N                              all of them: end of backward, optimizer step
  transient  = unsharded compute-dtype copies of the blocks in flight (current + prefetched, params and
               gradients), the lm head kept gathered from forward to backward, the root's parameters
  activations (per micro-batch, activations.py) = what the decoder keeps from forward to backward (every
               layer's saved tensors, or with full recompute only each layer's input), the vision tower's
               when it trains, and the larger of the loss's working set and one layer's backward.
The total is the step's PEAK: resident + the largest of its phases (`_phases`):
  forward and loss        transient + everything kept + the final norm's tensors + the loss's buffers
  backward of layer l     transient + what the layers 0..l keep + layer l's working set + the gradients made
                          so far (lm head, layers > l; with G > 1 all of them) -- l runs from the last down
  vision backward         transient + the vision tower's activations + all gradients (when it trains)
  optimizer step          all gradients (+ foreach AdamW's temporaries)
so the rows add up to more than the total: the difference is what is not alive at the peak (gradients not
made yet, activations already freed), printed as its own line. Allocator fragmentation, the CUDA context
(~0.5-1 GiB) and NCCL buffers are not in the estimate: keep ~10% headroom.

With LoRA (`--lora-r`, train/lora.py) the base is frozen and stored in the compute dtype; only the A adapter
parameters train (fp32 shards, gradients and AdamW state):
  resident   = c B * (base parameters) / N + (4 + 8) B * A / N;  gradients = 4 B * A / N
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

Expert parallelism (`--expert-model-parallel-size EP`): the same sharded state, but a MoE layer all-gathers
only its own E/EP experts, so the transient buffers shrink; its communication is communication.py's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mmtune.models import architecture_for_config
from mmtune.plan.activations import (
    DTYPE_BYTES,
    decoder_layer_bytes_per_token,
    final_norm_bytes_per_token,
    kept_bytes_per_token,
    layer_backward_extra_bytes_per_token,
    layer_working_bytes_per_token,
    vision_block_bytes_per_patch,
)
from mmtune.plan.communication import communication
from mmtune.plan.params import AdapterCounts, ParamCounts, build_meta_model, count_params
from mmtune.train.freeze import MODULES

GiB = 1024**3


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
    rows: dict[str, float] = field(default_factory=dict)  # bytes per GPU, each part at its largest
    notes: list[str] = field(default_factory=list)
    adapters: AdapterCounts | None = None
    grad_accum_steps: int = 1
    trainable: int = 0  # trainable parameters
    context_parallel_size: int = 1
    ep: int = 1  # --expert-model-parallel-size
    comm: dict[int, dict[str, float]] = field(default_factory=dict)  # communication() by ep size: 1 and ep
    reduce_scatter_bytes: float = 0.0  # fp32 gradient bytes one GPU sends in one micro-batch's reduce-scatters
    peak_phase: str = ""  # where in the step the peak is
    peak_bytes: float = 0.0  # the step's peak per GPU
    peak_sharded: float = 0.0  # of it: parameter, gradient and AdamW shards (the part more GPUs divide)

    @property
    def reduce_scatter_bytes_per_step(self) -> float:
        """Gradient bytes each GPU sends per optimizer step: one reduce-scatter per micro-batch."""
        return self.grad_accum_steps * self.reduce_scatter_bytes

    @property
    def total_bytes(self) -> float:
        """The step's peak per GPU (the rows less what is not alive at that moment)."""
        return self.peak_bytes

    @property
    def not_at_peak(self) -> float:
        return sum(self.rows.values()) - self.peak_bytes

    @property
    def fits(self) -> bool:
        return self.total_bytes <= 0.9 * self.gpu_mem_gib * GiB


def estimate(config, *, gpus: int = 1, gpu_mem_gib: float = 80.0, seq_length: int = 4096,
             micro_batch_size: int = 1, recompute: str = "full", compute_dtype: str = "bf16",
             frozen: tuple[str, ...] = ("vision_encoder", "vision_projector"), image_patches: int | None = None,
             loss_chunk_size: int = 1024, forward_prefetch: int = 1, fused_adamw: bool = True,
             grad_accum_steps: int = 1, config_name: str = "model", params: ParamCounts | None = None,
             adapters: AdapterCounts | None = None, context_parallel_size: int = 1, ep: int = 1) -> Plan:
    """Per-GPU memory of one training step under FSDP2 sharding over `gpus` ranks (see module docstring).
    `grad_accum_steps`: micro-batches per optimizer step (memory as one micro-batch, with the gradient shards
    of the earlier ones alive).

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
    if compute_dtype not in DTYPE_BYTES:
        raise ValueError(f"--compute-dtype {compute_dtype!r}: use one of {sorted(DTYPE_BYTES)}")
    unknown = set(frozen) - set(MODULES)
    if unknown:
        raise ValueError(f"--freeze {sorted(unknown)}: modules are {sorted(MODULES)}")
    from mmtune.distributed.parallel_dims import ParallelDims

    ParallelDims(gpus, cp=cp, ep=ep).check_model(num_experts=architecture_for_config(config).num_experts(config))
    params = params or count_params(build_meta_model(config))
    c = DTYPE_BYTES[compute_dtype]
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
    resident = sum(rows.values()) - rows["gradients (fp32 shards)"]

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
    rows["FSDP all-gather / reduce-scatter buffers"] = transient

    # activations of one micro-batch, per token (activations.py): what each decoder layer keeps from its
    # forward to its backward, and what it holds at the largest moment of its backward
    L = t.num_hidden_layers
    extra = 0.0
    if adapters is not None:  # each adapter saves its [tokens, r] intermediate (per routed slot for experts)
        routed = 2 * adapters.expert_banks_per_layer * t.num_experts_per_tok if adapters.expert_banks_per_layer else 0
        extra = c * adapters.r * (adapters.linear_modules_per_layer + routed)
    text_trains = "text_decoder" not in frozen and (adapters is None or adapters.by_module["text_decoder"] > 0)
    if not text_trains:  # no backward through the decoder: it keeps nothing
        kept_l, work_l, kept_other = [0.0] * L, [0.0] * L, 0.0
    elif recompute == "none":
        kept_l = [decoder_layer_bytes_per_token(t, i, c, kv_repeat) + extra for i in range(L)]
        work_l = [layer_backward_extra_bytes_per_token(t, i, c) for i in range(L)]
        kept_other = kept_bytes_per_token(t, c)
    else:  # full recompute: each layer's input is kept; in backward it is recomputed
        kept_l = [float(c * t.hidden_size)] * L
        work_l = [layer_working_bytes_per_token(t, i, c, kv_repeat, extra) for i in range(L)]
        kept_other = kept_bytes_per_token(t, c)
    if loss_chunk_size <= 0:  # plain: fp32 logits, log-softmax and their gradient over all tokens
        loss_act = tokens * t.vocab_size * 4.0 * 3
    else:  # chunked (train/loss.py): one fp32 [chunk, V] buffer, plus its copy in a narrower compute dtype
        loss_act = min(loss_chunk_size, tokens) * t.vocab_size * (4.0 + (c if c < 4 else 0))
    final = tokens * final_norm_bytes_per_token(t, c)
    # cp: the token embeddings, the image features merged into them and the merged result of the whole
    # sequence exist on every GPU before the split (at most S image tokens)
    cp_embed = 3.0 * micro_batch_size * seq_length * t.hidden_size * c if cp > 1 else 0.0
    rows["activations: decoder (saved for backward)"] = tokens * (sum(kept_l) + kept_other) + final
    vision_trains = "vision_encoder" not in frozen and (adapters is None or adapters.by_module["vision_encoder"] > 0)
    vision_work = 0.0
    if vision_trains:
        pb = vision_block_bytes_per_patch(v, c)
        vision_kept = rank_patches * v.depth * (pb if recompute == "none" else v.hidden_size * c)
        vision_work = rank_patches * pb if recompute == "full" else 0.0
    else:
        vision_kept = rank_patches * v.hidden_size * c * 2.0  # the tower's output, before the merger
    rows["activations: vision"] = vision_kept + vision_work
    rows["activations: loss chunk / one layer's backward"] = max(loss_act, tokens * max(work_l), cp_embed)
    step_temp = 0.0 if fused_adamw else 2 * 4.0 * trainable / n  # foreach AdamW temporaries at the step
    if step_temp:
        rows["optimizer step temporaries (foreach AdamW)"] = step_temp

    # the step's peak over its phases (module docstring): (gradient shards alive, everything else)
    grads = rows["gradients (fp32 shards)"]
    carried = grads if grad_accum_steps > 1 else 0.0  # the earlier micro-batches' gradient shards
    layer_grads = _layer_gradients(params, adapters, t, n, text_trains)
    made = 4.0 * head_grad / n  # the lm head's gradient, made by the loss's backward
    common = transient + vision_kept + tokens * kept_other
    phases = {"forward and loss": (carried, common + tokens * sum(kept_l) + final + loss_act)}
    if cp > 1:
        phases["start of the forward (cp: the whole sequence's embeddings)"] = (carried, transient + cp_embed)
    if text_trains:
        for i in reversed(range(L)):
            alive = common + tokens * (sum(kept_l[:i + 1]) + work_l[i])  # layers 0..i keep theirs; i works
            phases[f"backward of decoder layer {i}"] = (max(carried, made), alive)
            made += layer_grads[i]
    if vision_trains:
        phases["backward of the vision tower"] = (grads, transient + vision_kept + vision_work)
    phases["optimizer step"] = (grads, step_temp)
    peak_phase = max(phases, key=lambda k: sum(phases[k]))
    peak_grads, peak_other = phases[peak_phase]

    plan = Plan(config_name, gpus, gpu_mem_gib, seq_length, micro_batch_size, recompute, compute_dtype,
                image_patches, params, sorted(frozen), rows, [], adapters, grad_accum_steps=grad_accum_steps,
                trainable=trainable, context_parallel_size=cp, ep=ep, peak_phase=peak_phase,
                peak_bytes=resident + peak_grads + peak_other, peak_sharded=resident + peak_grads)
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


def _layer_gradients(params: ParamCounts, adapters: AdapterCounts | None, t, n: int, text_trains: bool) -> list[float]:
    """fp32 gradient-shard bytes each decoder layer's backward makes (per GPU): its parameters', or with LoRA
    its share of the text decoder's adapters."""
    L = t.num_hidden_layers
    if not text_trains:
        return [0.0] * L
    if adapters is not None:
        return [4.0 * adapters.by_module["text_decoder"] / L / n] * L
    counts = params.decoder_layers or (params.by_module["text_decoder"] / L,) * L
    return [4.0 * p / n for p in counts]


def human(nbytes: float) -> str:
    return f"{nbytes / GiB:.1f} GiB" if nbytes >= GiB else f"{nbytes / 1024**2:.1f} MiB"


def _grad_accum_note(plan: Plan) -> str:
    g = plan.grad_accum_steps
    return (f"grad accumulation x{g}: gradients stay sharded between micro-batches (the gradients row); "
            f"{g} reduce-scatter{'s' if g > 1 else ''} of the fp32 gradient per step, "
            f"{human(plan.reduce_scatter_bytes_per_step)} sent per GPU")


def _advice(plan: Plan, fewer_rows: Plan | None = None) -> list[str]:
    """What the plan says: fits or not, and what to change. `fewer_rows`: the same step as micro-batch 1 with
    proportionally more grad accumulation (estimated), when the micro-batch is larger than 1."""
    budget = 0.9 * plan.gpu_mem_gib * GiB
    total = plan.total_bytes
    accum = [_grad_accum_note(plan)] if plan.grad_accum_steps > 1 else []
    if total <= budget:
        return accum + [f"fits: {human(total)} of {plan.gpu_mem_gib:g} GiB (10% kept for the allocator, CUDA, NCCL)"]
    out = accum + [f"does NOT fit: {total / GiB:.1f} GiB > {budget / GiB:.1f} GiB usable of {plan.gpu_mem_gib:g} GiB"]
    r = plan.rows
    static = plan.peak_sharded  # what more GPUs divide: the parameter, gradient and AdamW shards at the peak
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
                   f"batch: {human(fewer_rows.total_bytes)} per GPU ({verdict}; saves "
                   f"{human(total - fewer_rows.total_bytes)} of activations, costs "
                   f"{human(fewer_rows.reduce_scatter_bytes_per_step - plan.reduce_scatter_bytes_per_step)} more "
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
