"""Every mmtune training mode on one GPU, side by side with transformers on the same batches and weights:
one prepared script for one GPU session (one H100/H200, about 10 minutes, no network; it installs nothing).

The model: a reduced-depth, real-width GLM-4.5V (text: 1 dense + N MoE layers of 4096 wide, 128 experts
top-8, vocab 151552; vision: 1 block, frozen, as the recipe), bf16 compute; `--arch glm4v`: the dense
GLM-4.1V's widths with --layers of its 40 layers. Each mode builds mmtune's model the way `mmtune train`
does — a 1-rank process group (NCCL for CUDA tensors, gloo for CPU ones), FSDP2 with
MixedPrecisionPolicy(param bf16, reduce fp32) over fp32 master weights — and times forward+backward
(varlen flash attention, grouped-GEMM experts, chunked lm-head cross-entropy) and the whole optimizer step
(+ clip + AdamW). transformers runs its model (the same architecture, `mmtune.models` registry) in bf16
(grouped_mm experts, sdpa) on the same batch with the same weights (every tensor drawn on the device from
its name's seed), once per batch shape, always as a full finetune.

The modes (`MODES`, run in this order; `--modes` picks some):
  eager     FSDP2 only: the baseline path
  compiled  + --use-torch-compile (per-block torch.compile; the compile time is reported apart)
  ep        expert parallelism (all-to-all dispatch). On one GPU EP = 1: the dispatch path runs on one
            rank and splits nothing, so this measures the machinery's overhead, not EP's gains; with
            torchrun N ranks and --expert-model-parallel-size EP the experts are split EP ways. A dense
            model (--arch glm4v) has no experts: skipped, and the JSON says so
  lora      LoRA r=16 (alpha 32) on every Linear of the decoder and the routed experts, as `mmtune train
            --lora-r 16` applies it (train/lora.py): the frozen base stored in the compute dtype (bf16),
            fp32 adapters, A random and B = 0, so its first loss is the base model's. transformers' column
            is its FULL finetune on the same batch (labelled so): PEFT puts one adapter over all experts of
            a stacked projection ([E*r, In]), a different parametrisation, so a PEFT column would not be the
            same work. The trainable parameter count is reported
  long      one row of --long-seq tokens: long-sequence attention and the chunked loss at length. One GPU
            cannot split the row: at --context-parallel-size 1 context parallelism is off (its path is the
            plain one); with torchrun N ranks and --context-parallel-size N every mode splits its rows
  offload   eager + FSDP2 CPU offload (model.json offload_to_cpu): parameters, gradients and AdamW state in
            host memory, AdamW on the CPU; GPU memory and step time next to eager. At most 2 timed steps
Apart from the modes, in the same JSON:
  loss_memory  lm_loss forward+backward alone in bf16 at vocab 151552 x 8192 tokens x hidden 4096 (CPU:
               a tiny one): the peak memory the chunked loss adds next to the plain one, and whether the
               chunked loss used the fp32-output addmm (`loss_chunked_fp32_out_addmm`, CUDA only)
  saves        with --save-dir (a --dry-run: a temp dir): the time one checkpoint save of the eager mode's
               model + AdamW state blocks training, synchronous vs --async-save (train/checkpoint.py)

Budget: the session has about 10 minutes. Each mode's wall time is printed as it ends; a mode starts
only while the time since the start plus the longest mode so far stays within --budget-s (default
480 s; the first mode always runs); the others are skipped and named in the JSON and the table
("skipped: budget"). Modes run in the order above, the most wanted figures first.

Printed: one table row per mode (tokens/s of both, the ratio, MFU, step time, peak memory, both first
losses — same weights, so they agree to bf16 noise — and the wall time), the loss-memory and save lines,
and the paths that ran (grouped GEMM, varlen flash). MFU = (6 * N_active + causal attention) FLOPs per
token over the card's measured bf16 matmul ceiling and over the nominal 989 TFLOP/s of an H100/H200 SXM.
Results go to $OUT/gpu_train.json (and gpu_train.md) when OUT is set.

    python bench/gpu_train.py                       # H100/H200: every mode, under 8 minutes
    python bench/gpu_train.py --arch glm4v          # the dense GLM-4.1V (8 of its 40 layers)
    python bench/gpu_train.py --modes eager --save-dir /local/disk/tmp   # + save blocked time (~45 GB)
    python bench/gpu_train.py --dry-run             # CPU, tiny config, fp32, gloo: every path, in a minute
    python bench/gpu_train.py --cpu                 # CPU, fp32: docs/PERFORMANCE.md's 7.3M-param model, 4 x 512
    torchrun --nproc_per_node 4 bench/gpu_train.py --context-parallel-size 4 --modes long --long-seq 131072 --skip-hf
    torchrun --nproc_per_node 8 bench/gpu_train.py --expert-model-parallel-size 8 --modes eager,ep --moe-layers 4

Under torchrun every rank but those of one context-parallel group reads its own batch; tokens/s counts
every rank's tokens, MFU is per GPU, peak memory is rank 0's, and transformers (one device) runs only in
a --dry-run's context-parallel check (rank 0, the group's one row). `vs_eager` is each mode's speed over the
eager mode's in the same run (with EP > 1: EP over FSDP only at the same batch).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import statistics
import sys
import time
import zlib
from pathlib import Path
from typing import NamedTuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_sections import run_loss_memory, time_saves  # noqa: E402  (bench/gpu_sections.py)


class Mode(NamedTuple):
    name: str
    what: str
    compile: bool = False
    long: bool = False  # one row of --long-seq tokens instead of --bs x --seq
    lora_r: int = 0
    ep: bool = False  # experts split over --expert-model-parallel-size ranks, tokens by all-to-all (also at 1)
    offload: bool = False  # FSDP2 CPUOffloadPolicy: parameters, gradients and optimizer state on the host
    max_steps: int | None = None  # at most this many timed steps (and 1 warm-up): a slow mode


LORA_R = 16
MODES = [
    Mode("eager", "FSDP2 only (1 rank): bf16 params, fp32 reduce, varlen flash, grouped GEMM, chunked CE, fused AdamW"),
    Mode("compiled", "eager + --use-torch-compile (per-block torch.compile)", compile=True),
    Mode("ep", "expert parallelism at --expert-model-parallel-size (1 on one GPU: the all-to-all dispatch path "
               "on one rank, nothing split)", ep=True),
    Mode("lora", f"LoRA r={LORA_R} on the frozen bf16 base, fp32 adapters (transformers: its full finetune)",
         lora_r=LORA_R),
    Mode("long", "one long row (--long-seq); split over the ranks with --context-parallel-size N", long=True),
    Mode("offload", "eager + FSDP2 CPU offload (offload_to_cpu): params, grads, AdamW on the host", offload=True,
         max_steps=2),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/gpu_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="all", help=f"comma-separated subset of {[m.name for m in MODES]} (default all)")
    p.add_argument("--arch", choices=["glm4v_moe", "glm4v"], default="glm4v_moe",
                   help="glm4v_moe: GLM-4.5V (default); glm4v: the dense GLM-4.1V / GLM-4.6V-Flash")
    p.add_argument("--moe-layers", type=int, default=1, help="glm4v_moe: MoE decoder layers after the dense one "
                   "(default 1; each adds 2.2B params — with fp32 AdamW state 3 layers do not fit 80 GB)")
    p.add_argument("--layers", type=int, default=8, help="glm4v: dense decoder layers (default 8 of the real 40; "
                   "fp32 AdamW state for all 40 needs about 154 GiB)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--bs", type=int, default=1, help="rows per micro-batch (default 1)")
    p.add_argument("--long-seq", type=int, default=32768, help="tokens of the long mode's one row (default 32768)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--chunk-size", type=int, default=4096, help="chunked-loss tokens per chunk (default 4096)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled mode "
                   "(default inductor; --dry-run: aot_eager, the same tracing without code generation)")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' model")
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="the ep mode's expert-parallel size (launch a multiple of it with torchrun; default 1: the "
                        "dispatch path on one rank)")
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each row over this many ranks in every mode (Ulysses; launch as many with torchrun; "
                        "default 1). transformers runs on one device: with N > 1 only the --dry-run runs it (rank 0)")
    p.add_argument("--skip-optimizer", action="store_true", help="do not time the full optimizer step")
    p.add_argument("--save-dir", help="also time one checkpoint save of the eager mode's model + AdamW state into "
                   "DIR, synchronous and --async-save (blocked time, and the background write's total); needs ~12 "
                   "bytes per parameter of free disk (--moe-layers 1: ~45 GB; checked first); --dry-run on one "
                   "rank: a temp dir")
    p.add_argument("--budget-s", type=float, default=480.0,
                   help="seconds the whole run may take (default 480): a mode starts only while the time so far plus "
                        "the longest mode so far stays within it; the rest are skipped (named in the JSON)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config, fp32, gloo: checks every path runs")
    p.add_argument("--cpu", action="store_true", help="CPU, fp32, docs/PERFORMANCE.md's 7.3M-param model (text 256 "
                   "wide, 4 layers, 16 experts top-4; vision 2 blocks), --bs 4 --seq 512 unless given")
    args = p.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if args.dry_run:
        args.seq, args.long_seq, args.steps, args.warmup = min(args.seq, 64), min(args.long_seq, 256), 1, 1
        if "--compile-backend" not in given:
            args.compile_backend = "aot_eager"  # the CPU check of the compiled path: tracing, not code generation
    elif args.cpu:
        args.seq = args.seq if "--seq" in given else 512
        args.bs = args.bs if "--bs" in given else 4
        args.long_seq = args.long_seq if "--long-seq" in given else 4096
    names = [m.name for m in MODES] if args.modes == "all" else [x.strip() for x in args.modes.split(",") if x.strip()]
    unknown = sorted(set(names) - {m.name for m in MODES})
    if unknown:
        p.error(f"--modes: unknown {unknown}; choose from {[m.name for m in MODES]}")
    if not args.budget_s > 0:
        p.error(f"--budget-s must be > 0 seconds, got {args.budget_s}")
    if args.arch == "glm4v" and args.expert_model_parallel_size > 1:
        p.error("--expert-model-parallel-size needs experts: use --arch glm4v_moe (glm4v is dense)")
    args.mode_list = [m for m in MODES if m.name in names]
    return args


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> tuple[float, float]:
    """(median, best) seconds per call after `warmup` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), min(times)


def matmul_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t, _ = timed(lambda: a @ b, device, 3, 10)
    return 2 * 8192**3 / t


def build_config(args):
    """The bench model's config (args: arch, dry_run, cpu, moe_layers, layers, long_seq; missing ones take
    their defaults — bench/expert_parallel.py passes only some)."""
    arch, tiny = getattr(args, "arch", "glm4v_moe"), args.dry_run or args.cpu
    if arch == "glm4v":
        from mmtune.models.glm4v import glm41v_config, tiny_config as dense_tiny

        cfg = dense_tiny() if tiny else glm41v_config()
        if not tiny:
            cfg.text.num_hidden_layers = getattr(args, "layers", 8)
    else:
        from mmtune.models.glm4v_moe import glm45v_config, tiny_config

        cfg = tiny_config() if tiny else glm45v_config()
        cfg.text.num_hidden_layers = cfg.text.first_k_dense_replace + args.moe_layers
    cfg.vision.depth = 1
    if args.cpu:  # the models of bench/model_step_cpu.py
        t = cfg.text
        t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.num_hidden_layers = 256, 4, 2, 4
        t.mrope_section = [4, 6, 6]
        if arch == "glm4v":
            t.intermediate_size = 1024
        else:
            t.intermediate_size, t.moe_intermediate_size, t.head_dim = 512, 128, 64
            t.n_routed_experts, t.num_experts_per_tok = 16, 4
        cfg.vision.depth, cfg.vision.out_hidden_size = 2, 256
    cfg.text.max_position_embeddings = max(cfg.text.max_position_embeddings, getattr(args, "long_seq", 0))
    return cfg


def make_batch(cfg, bs: int, seq: int, device, seed: int = 0):
    """Text-only rows of random tokens, labels shifted, one packed segment per row (the varlen path)."""
    from mmtune.tokens import TINY_SPECIAL_BASE, TINY_VOCAB_SIZE

    g = torch.Generator().manual_seed(seq * 1000 + seed)
    high = TINY_SPECIAL_BASE if cfg.text.vocab_size == TINY_VOCAB_SIZE else 150000  # no special tokens
    ids = torch.randint(0, high, (bs, seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    pos = torch.arange(seq).expand(3, bs, seq).contiguous()
    cu = torch.arange(0, bs * seq + 1, seq, dtype=torch.int32)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, "num_samples": bs}
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def init_by_name(model, std: float, seed: int = 0) -> None:
    """The same weights in any model with these parameter names, however sharded or placed: each full
    tensor drawn on the compute device (an offloaded parameter's mesh device) from a generator seeded by its
    name, each rank keeping its shard (init_weights draws on the CPU: minutes for billions). LoRA adapters
    are left to train/lora.init_adapters."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from mmtune.ops.lora import is_adapter_name

    for name, p in model.named_parameters():
        if is_adapter_name(name):
            continue
        draw = torch.device(p.device_mesh.device_type) if isinstance(p, DTensor) else p.device
        if p.dim() == 1:  # norms 1, biases 0
            full = torch.full(p.shape, 1.0 if "norm" in name and name.endswith("weight") else 0.0, device=draw)
        else:
            g = torch.Generator(device=draw).manual_seed(seed + zlib.crc32(name.encode()))
            full = torch.empty(p.shape, device=draw).normal_(0.0, std, generator=g)
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None).to_local())
        else:
            p.copy_(full)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.zero_()


def paths_taken(device, dtype) -> dict:
    """Which kernels the CUDA path can use here (what the modes exercise)."""
    from mmtune.ops.attention import _varlen_ok
    from mmtune.ops.moe import _grouped_mm_ok

    x = torch.zeros(16, 64, device=device, dtype=dtype)
    w = torch.zeros(2, 64, 64, device=device, dtype=dtype)
    return {"grouped_mm": _grouped_mm_ok(x, w), "varlen_flash": _varlen_ok(torch.zeros(1, 1, 8, 64, device=device,
                                                                                         dtype=dtype))}


def skip_reason(mode: Mode, arch, elapsed: float, longest: float, budget: float) -> str | None:
    """Why `mode` does not run (None: it runs): a feature the model lacks, or the time left — judged by the
    longest mode so far (`longest`; 0 before the first, which always runs)."""
    if mode.ep and not arch.has_experts:
        return "skipped: dense model has no experts"
    if longest and elapsed + longest > budget:
        return (f"skipped: budget ({elapsed:.0f} s so far + {longest:.0f} s, the longest mode so far, "
                f"> --budget-s {budget:.0f})")
    return None


def _agreed(skip: str | None, device) -> str | None:
    """Under torchrun every rank must run the same modes (their collectives pair up), but each rank reads its
    own clock: a mode is skipped when any rank would skip it."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return skip
    flag = torch.tensor([1.0 if skip else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return skip or ("skipped: budget (on another rank's clock)" if flag.item() else None)


def _offloaded(model) -> bool:
    """Whether FSDP2 keeps every parameter of the model in host memory (its CPUOffloadPolicy)."""
    from torch.distributed.fsdp import FSDPModule

    groups = [m._get_fsdp_state()._fsdp_param_group for m in model.modules() if isinstance(m, FSDPModule)]
    params = [fp for g in groups if g is not None for fp in g.fsdp_params]
    return bool(params) and all(fp.offload_to_cpu for fp in params)


def run_mode(mode: Mode, cfg, args, device, batch, r: dict, saves: dict | None = None) -> None:
    """Build mmtune's model for `mode` as `mmtune train` does and time it; results into `r`. `saves`: time a
    checkpoint save of this model + optimizer into it (gpu_sections.time_saves)."""
    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.distributed.compile import compile_counters
    from mmtune.distributed.context_parallel import ContextParallel
    from mmtune.distributed.parallelize import materialize, parallelize, store_frozen_in, unshard_lm_head
    from mmtune.models import architecture_for_config
    from mmtune.train.loss import LossContext, lm_loss
    from mmtune.train.moe_balance import load_summary
    from mmtune.train.optim import build_optimizer, build_scheduler
    from mmtune.train.trainer import LoopSettings, Trainer

    ep = args.expert_model_parallel_size if mode.ep else 1
    env = init_distributed(device.type, cp=args.context_parallel_size, ep=ep)
    r["backend"] = torch.distributed.get_backend()
    expert_mesh = env.dims.expert_mesh
    if mode.ep and expert_mesh is None:  # EP = 1: the dispatch path on a one-rank ep mesh (nothing split)
        expert_mesh = env.dims.meshes["world"]._unflatten(0, (1, env.world_size, 1), ("dp_replicate", "efsdp", "ep"))
    r["expert_parallel_size"] = ep if mode.ep else 0
    cp = ContextParallel.from_mesh(env.dims.cp_mesh)  # None at cp 1: nothing to split
    dp_group = env.dims.dp_mesh.get_group() if env.dims.dp_mesh is not None else None
    if cp is not None:  # every rank holds the row; the model keeps seq/cp tokens of it
        batch, _ = cp.pad_batch(batch, None, cfg.text.pad_token_id)
    if mode.compile:  # a fresh dynamo cache: a caller's earlier compiles of the same layer code (a test
        torch._dynamo.reset()  # process) must not count against torch's per-function recompile limit
    compiled_before = compile_counters()
    with torch.device("meta"):
        model = architecture_for_config(cfg).model_class(cfg)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)  # the recipe's default: vision encoder and projector frozen
    bf16 = device.type == "cuda"
    opts = FSDPOptions(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None,
                       torch_compile=mode.compile, compile_backend=args.compile_backend, cpu_offload=mode.offload)
    if mode.lora_r:  # as train/model_build.py: adapters on the meta model, the frozen base in the compute dtype
        from mmtune.train.freeze import FreezeSpec
        from mmtune.train.lora import LoRAConfig, apply_lora

        info = apply_lora(model, LoRAConfig(r=mode.lora_r, alpha=2.0 * mode.lora_r), FreezeSpec())
        store_frozen_in(model, opts.param_dtype)
        r["lora"] = {"r": mode.lora_r, "alpha": 2.0 * mode.lora_r, "adapted_modules": len(info.modules)}
    parallelize(model, env.mesh, opts, device, cp_mesh=env.dims.cp_mesh, expert_mesh=expert_mesh)
    materialize(model, device, cpu_offload=mode.offload)
    init_by_name(model, cfg.text.initializer_range)
    if mode.lora_r:
        from mmtune.train.lora import init_adapters

        init_adapters(model, seed=0)  # A random, B = 0: the first loss is the base model's
    r["params"] = sum(p.numel() for p in model.parameters())
    r["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    r["params_on"] = next(p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()).device.type
    r["fsdp_offload_to_cpu"] = _offloaded(model)
    window = [(batch["labels"], batch["cu_seqlens"])]
    warmup, steps = args.warmup, args.steps
    if mode.max_steps:
        warmup, steps = min(warmup, 1), min(steps, mode.max_steps)

    def fwd_bwd():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                    return_logits=False, run_vision_without_images=True)
        ctx = LossContext.for_window("per_token_loss", window, group=dp_group)
        lo = lm_loss(out.hidden_states, unshard_lm_head(model), batch["labels"], ctx, cu_seqlens=batch["cu_seqlens"],
                     compute_mode="chunk", chunk_size=args.chunk_size, cp=cp)
        lo.loss_for_backward.backward()
        model.zero_grad(set_to_none=True)
        return lo.loss_value

    def compiled_so_far():
        now = compile_counters()
        return {k: now[k] - compiled_before[k] for k in now}

    t0 = time.perf_counter()
    first = fwd_bwd().double()
    r["first_step_s"] = time.perf_counter() - t0  # with compile: mostly compiling
    torch.distributed.all_reduce(first)  # each cp rank holds its tokens' part of the loss
    r["first_loss"] = float(first)
    if mode.compile:
        r["compile"] = compiled_so_far()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r["fwd_bwd_s"], r["fwd_bwd_best_s"] = timed(fwd_bwd, device, warmup, steps)
    if device.type == "cuda":
        r["fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if mode.compile:
        r["compile_after_timing"] = compiled_so_far()  # the same frames: the timed steps did not recompile
    if not args.skip_optimizer:
        opt = build_optimizer(model, lr=1e-6, weight_decay=0.0)
        r["fused_adamw"] = bool(opt.defaults.get("fused"))
        sched = build_scheduler(opt, lr=1e-6, min_lr=0.0, warmup_iters=0, decay_iters=10**6, decay_style="constant")
        s = LoopSettings(train_iters=10**6, grad_accum_steps=1, loss_type="per_token_loss", compute_mode="chunk",
                         chunk_size=args.chunk_size, clip_grad=1.0)
        trainer = Trainer(s, env, model, opt, sched, [batch])
        load = trainer.train_step([batch]).expert_load  # routing balance of these weights (1.0 = every expert
        if load is not None:                            # equally busy): EP's speed depends on it
            r["moe_load_max_mean"] = load_summary(load)["moe_load_max_mean"]
        r["step_s"], r["step_best_s"] = timed(lambda: trainer.train_step([batch]), device, warmup, steps)
        if device.type == "cuda":
            r["step_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if saves is not None:
            _guarded(lambda: time_saves(model, opt, args, saves), saves, device)
        del opt, sched, trainer
    del model
    if mode.compile:
        torch._dynamo.reset()  # the compiled graphs' caches must not keep this model's memory for the next mode
    _free(device)


def run_hf(cfg, args, device, batch, r: dict) -> None:
    """transformers' model of the same architecture, full finetune, on the same batch and weights."""
    import transformers

    from mmtune.models import architecture_for_config

    arch = architecture_for_config(cfg)
    hf_class = getattr(transformers, arch.hf_class_name)
    hf_cfg = getattr(transformers, arch.hf_class_name.replace("ForConditionalGeneration", "Config")).from_dict(
        cfg.to_dict())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = hf_class._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    if arch.has_experts:
        model.set_experts_implementation("grouped_mm")  # transformers' fastest, on the CPU too (docs/PERFORMANCE.md)
    init_by_name(model, cfg.text.initializer_range)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    model.train()
    r["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ids = batch["input_ids"]

    def fwd_bwd():  # transformers shifts the labels itself: labels=ids is mmtune's shifted batch["labels"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    r["first_loss"] = float(fwd_bwd())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r["fwd_bwd_s"], r["fwd_bwd_best_s"] = timed(fwd_bwd, device, args.warmup, args.steps)
    if device.type == "cuda":
        r["fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    r["transformers"] = transformers.__version__
    del model
    _free(device)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _guarded(fn, r: dict, device) -> None:
    """Run one measurement; an error (out of memory, a path that fails) is recorded, the others go on."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - one mode failing must not cost the session the other modes
        r["error"] = f"{type(e).__name__}: {str(e)[:400]}"
        _free(device)


def _note(name: str, m: dict, hf: dict) -> str:
    if m.get("skipped") or m.get("error"):
        return m.get("skipped") or m["error"]
    notes = []
    if "compile" in m:
        notes.append(f"compile {m['first_step_s']:.0f} s")
    if "lora" in m:
        notes.append(f"trainable {m['trainable_params']:,} of {m['params']:,} ({m['trainable_params'] / m['params']:.2%})"
                     + ("; transformers: full finetune" if hf.get("fwd_bwd_s") else ""))
    if name == "offload":
        notes.append(f"params on the {'host' if m.get('params_on') == 'cpu' else m.get('params_on')}")
    return "; ".join(notes)


def table(res: dict) -> str:
    rows = ["| mode | mmtune tokens/s | transformers tokens/s | ratio | vs eager (step) | MFU (measured peak) | "
            "step s | peak GiB | first loss mmtune / transformers | wall s | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["modes"].items():
        hf = {} if m.get("skipped") else res["hf"].get(str(m.get("seq_key")), {})
        f = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
        rows.append(f"| {name} | {f(m.get('tokens_per_s'), '.0f')} | {f(hf.get('tokens_per_s'), '.0f')} | "
                    f"{f(m.get('ratio_vs_hf'), '.2f')} | {f(m.get('vs_eager', {}).get('step'), '.2f')} | "
                    f"{f(m.get('mfu_vs_measured'), '.1%')} | {f(m.get('step_s'), '.3f')} | "
                    f"{f(m.get('step_peak_gib', m.get('fwd_bwd_peak_gib')), '.1f')} | "
                    f"{f(m.get('first_loss'), '.4f')} / {f(hf.get('first_loss'), '.4f')} | {f(m.get('wall_s'), '.0f')} | "
                    f"{_note(name, m, hf)} |")
    lm = res.get("loss_memory", {})
    if "loss_chunk_peak_added_gib" in lm:
        rows.append(f"\nlm_loss alone, bf16, vocab {lm['vocab']} x {lm['tokens']} tokens x hidden {lm['hidden']}: "
                    f"peak added chunked {lm['loss_chunk_peak_added_gib']:.2f} GiB, plain "
                    f"{lm['loss_default_peak_added_gib']:.2f} GiB; fp32-out addmm: {lm['loss_chunked_fp32_out_addmm']}")
    sv = res.get("saves", {})
    if "save_sync_blocked_s" in sv:
        rows.append(f"\ncheckpoint save of the eager mode's model + AdamW ({sv['state_gb']:.1f} GB): training blocked "
                    f"{sv['save_sync_blocked_s']:.2f} s sync, {sv['save_async_blocked_s']:.2f} s --async-save "
                    f"(its write done after {sv['save_async_total_s']:.2f} s)")
    elif sv.get("skipped") or sv.get("error"):
        rows.append(f"\ncheckpoint saves: {sv.get('skipped') or sv['error']}")
    return "\n".join(rows)


def main(argv=None) -> int:
    t_start = time.perf_counter()
    args = parse_args(argv)
    if args.dry_run or args.cpu:
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_train.py needs a CUDA GPU (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cp, ep, world = args.context_parallel_size, args.expert_model_parallel_size, int(os.environ.get("WORLD_SIZE", "1"))
    if cp > 1 and world % cp or ep > 1 and ("LOCAL_RANK" not in os.environ or world % ep):
        print(f"--context-parallel-size {cp} / --expert-model-parallel-size {ep}: launch a multiple of them with "
              f"torchrun --nproc_per_node", file=sys.stderr)
        return 2
    if world > 1:  # transformers runs on one device: only as the CPU check of one cp group's row (rank 0)
        args.skip_hf = args.skip_hf or not (args.dry_run and world == cp)
    rank0 = int(os.environ.get("RANK", "0")) == 0
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    own_group = not torch.distributed.is_initialized()  # a caller's process group is left as it was
    from mmtune.models import get_architecture
    from mmtune.train.metrics import text_flops_per_token

    arch = get_architecture(args.arch)
    cfg = build_config(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device)
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "arch": args.arch, "bs": args.bs, "seq": args.seq, "long_seq": args.long_seq, "budget_s": args.budget_s,
           "context_parallel_size": cp, "expert_model_parallel_size": ep, "world_size": world,
           "matmul_tflops": peak / 1e12 if peak else None, "paths": paths_taken(device, dtype),
           "loss_memory": {}, "modes": {}, "hf": {}}
    res.update({"moe_layers": args.moe_layers} if arch.has_experts else {"layers": cfg.text.num_hidden_layers})
    if rank0:
        _guarded(lambda: run_loss_memory(device, res["loss_memory"]), res["loss_memory"], device)
    saves = {} if args.save_dir or (args.dry_run and world == 1) else None  # the JSON's "saves" section
    if saves is not None:
        res["saves"] = saves
    batches, longest = {}, 0.0
    for mode in args.mode_list:
        bs, seq = (1, args.long_seq) if mode.long else (args.bs, args.seq)
        key = f"{bs}x{seq}"
        r = res["modes"][mode.name] = {"what": mode.what, "seq_key": key}
        skip = _agreed(skip_reason(mode, arch, time.perf_counter() - t_start, longest, args.budget_s), device)
        if skip:
            r["skipped"] = skip
            print(f"{mode.name}: {skip}", flush=True)
            continue
        t_mode = time.perf_counter()
        if key not in batches:  # the ranks of a cp group share a row; every other rank has its own tokens
            batches[key] = make_batch(cfg, bs, seq, device, seed=int(os.environ["RANK"]) // cp)
            if not args.skip_hf and rank0:
                hf = res["hf"][key] = {}
                _guarded(lambda: run_hf(cfg, args, device, batches[key], hf), hf, device)
        print(f"{mode.name}: {mode.what}", flush=True)
        mode_saves = saves if mode.name == "eager" else None  # the saves are timed on the eager mode's state
        _guarded(lambda: run_mode(mode, cfg, args, device, batches[key], r, mode_saves), r, device)
        r["wall_s"] = time.perf_counter() - t_mode  # with transformers' run when this mode was its shape's first
        longest = max(longest, r["wall_s"] - (mode_saves or {}).get("wall_s", 0.0))  # a mode's time, saves apart
        print(f"{mode.name}: {r['wall_s']:.0f} s" + (f" ({r['error']})" if "error" in r else ""), flush=True)
        for who, n_gpus in ((r, world), (res["hf"].get(key, {}), 1)):
            t = who.get("fwd_bwd_s")
            if t and "tokens_per_s" not in who:
                tokens = bs * seq * n_gpus // (cp if who is r else 1)  # every data-parallel rank's rows
                who["tokens_per_s"] = tokens / t
                if peak:  # per GPU
                    flops = text_flops_per_token(cfg.text, seq) * tokens
                    who["mfu_vs_measured"] = flops / t / peak / n_gpus
                    who["mfu_vs_989"] = flops / t / 989e12 / n_gpus
        hf = res["hf"].get(key, {})
        if hf.get("fwd_bwd_s") and r.get("fwd_bwd_s"):
            r["ratio_vs_hf"] = hf["fwd_bwd_s"] / r["fwd_bwd_s"]
            r["ratio_best_vs_hf"] = hf["fwd_bwd_best_s"] / r["fwd_bwd_best_s"]
        eager = res["modes"].get("eager", {})
        if mode.name != "eager" and eager.get("seq_key") == key and eager.get("step_s") and r.get("step_s"):
            r["vs_eager"] = {what: eager[f"{what}_s"] / r[f"{what}_s"] for what in ("fwd_bwd", "step")}
    if saves is not None and not saves:
        saves["skipped"] = "skipped: they save the eager mode's model and AdamW state, and its step did not run"
    if own_group and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    res["wall_s"] = time.perf_counter() - t_start
    if not rank0:
        return 0
    text = table(res)
    print(text)
    print(json.dumps({k: v for k, v in res.items() if k not in ("modes", "hf")}), flush=True)
    if os.environ.get("OUT"):
        out = Path(os.environ["OUT"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "gpu_train.json").write_text(json.dumps(res, indent=1))
        (out / "gpu_train.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
