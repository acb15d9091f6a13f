"""The `mmtune plan` command: the model (a preset or an HF dir), the freeze flags (model.json or --freeze),
the estimate (estimate.py) printed as rows per GPU, the step's peak, the verdict and what to change."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmtune.models import load_config as load_hf_config
from mmtune.models import presets
from mmtune.plan.activations import DTYPE_BYTES
from mmtune.plan.estimate import GiB, Plan, estimate
from mmtune.plan.params import count_adapters
from mmtune.train.freeze import MODULES

PRESETS = {name: make for name, (_, make) in presets().items()}


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
    lines.append("per GPU (each part at its largest; the total is the step's peak):")
    gone = "not alive at the peak"
    width = max(map(len, plan.rows))
    for k, b in plan.rows.items():
        lines.append(f"  {k:<{width}}  {b / scale:10.2f} {unit}")
    lines.append(f"  {gone:<{width}}  {-plan.not_at_peak / scale:10.2f} {unit}")
    lines.append(f"  {'total':<{width}}  {plan.total_bytes / scale:10.2f} {unit}  (the peak: {plan.peak_phase})")
    if plan.comm and plan.params.experts:  # a dense model has no routed experts to move
        layouts = {e: ("FSDP only" if e == 1 else f"EP {e} x efsdp {plan.gpus // e}") for e in plan.comm}
        lines.append("routed-expert communication sent per GPU: " + " | ".join(layouts.values()))
        for key in [*next(iter(plan.comm.values())), "total of a step of one micro-batch"]:
            cells = [sum(c.values()) if key.startswith("total") else c[key] for c in plan.comm.values()]
            lines.append(f"  {key:<{width}}  " + " | ".join(f"{b / GiB:10.2f} GiB" for b in cells))
    lines += plan.notes
    return "\n".join(lines)


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
    ap.add_argument("--compute-dtype", choices=sorted(DTYPE_BYTES), default="bf16",
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
