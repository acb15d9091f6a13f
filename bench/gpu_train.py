"""Every mmtune training mode on one GPU, side by side with transformers' Glm4vMoe on the same batches and
weights: one prepared script for one GPU session (one H100/H200, about 10 minutes, no network; it
installs nothing).

The model: a reduced-depth, real-width GLM-4.5V (text: 1 dense + N MoE layers of 4096 wide, 128 experts
top-8, vocab 151552; vision: 1 block, frozen, as the recipe), bf16 compute. Each mode builds mmtune's
model the way `mmtune train` does — a 1-rank NCCL process group, FSDP2 with MixedPrecisionPolicy(param
bf16, reduce fp32) over fp32 master weights — and times forward+backward (varlen flash attention,
grouped-GEMM experts, chunked lm-head cross-entropy) and the whole optimizer step (+ clip + fused AdamW).
transformers runs its model in bf16 (grouped_mm experts, sdpa) on the same batch with the same weights
(every tensor drawn on the device from its name's seed), once per batch shape.

The modes (`MODES`; adding one is one line there, `--modes` picks some):
  eager     FSDP2 only: the baseline path
  compiled  + --use-torch-compile (per-block torch.compile; the compile time is reported apart)
  ep        expert parallelism (all-to-all dispatch). On one GPU EP = 1: the dispatch path runs on one
            rank and splits nothing, so this measures the machinery's overhead, not EP's gains; with
            torchrun N ranks and --expert-model-parallel-size EP the experts are split EP ways
  lora      LoRA adapters on the frozen bf16 base (transformers' column: its full finetune, same batch)
  long      one row of --long-seq tokens: long-sequence attention and the chunked loss at length. One GPU
            cannot split the row: at --context-parallel-size 1 context parallelism is off (its path is the
            plain one); with torchrun N ranks and --context-parallel-size N every mode splits its rows
A mode whose feature is not in this checkout is listed as waiting (the JSON and the table say so).

Printed: one table row per mode (tokens/s of both, the ratio, MFU, step time, peak memory, both first
losses — same weights, so they agree to bf16 noise) and the paths that ran (grouped GEMM, varlen flash,
fused AdamW). MFU = (6 * N_active + causal attention) FLOPs per token over the card's measured bf16
matmul ceiling and over the nominal 989 TFLOP/s of an H100/H200 SXM. Results go to $OUT/gpu_train.json
(and gpu_train.md) when OUT is set.

    python bench/gpu_train.py                       # H100/H200: every mode, about 10 minutes
    python bench/gpu_train.py --modes eager,compiled --moe-layers 2 --seq 8192
    python bench/gpu_train.py --dry-run             # CPU, tiny config, fp32, gloo: every path, in seconds
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
import importlib.util
import json
import os
import socket
import statistics
import sys
import time
import zlib
from typing import NamedTuple
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class Mode(NamedTuple):
    name: str
    what: str
    compile: bool = False
    long: bool = False  # one row of --long-seq tokens instead of --bs x --seq
    lora_r: int = 0
    ep: bool = False  # experts split over --expert-model-parallel-size ranks, tokens by all-to-all (also at 1)
    needs: str | None = None  # a module this mode needs; absent from the checkout: the mode waits


MODES = [
    Mode("eager", "FSDP2 only (1 rank): bf16 params, fp32 reduce, varlen flash, grouped GEMM, chunked CE, fused AdamW"),
    Mode("compiled", "eager + --use-torch-compile (per-block torch.compile)", compile=True),
    Mode("ep", "expert parallelism at --expert-model-parallel-size (1 on one GPU: the all-to-all dispatch path "
               "on one rank, nothing split)", ep=True),
    Mode("lora", "LoRA r=16 on the frozen bf16 base (transformers: full finetune)", lora_r=16, needs="mmtune.train.lora"),
    Mode("long", "one long row (--long-seq); split over the ranks with --context-parallel-size N", long=True),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/gpu_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--modes", default="all", help=f"comma-separated subset of {[m.name for m in MODES]} (default all)")
    p.add_argument("--moe-layers", type=int, default=1, help="MoE decoder layers after the dense one (default 1; "
                   "each adds 2.2B params — with fp32 AdamW state 3 layers do not fit 80 GB)")
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
    from mmtune.models.glm4v_moe import glm45v_config, tiny_config

    cfg = tiny_config() if (args.dry_run or args.cpu) else glm45v_config()
    cfg.text.num_hidden_layers = cfg.text.first_k_dense_replace + args.moe_layers
    cfg.vision.depth = 1
    if args.cpu:
        t = cfg.text
        t.hidden_size, t.intermediate_size, t.moe_intermediate_size = 256, 512, 128
        t.num_attention_heads, t.num_key_value_heads, t.head_dim = 4, 2, 64
        t.n_routed_experts, t.num_experts_per_tok, t.num_hidden_layers = 16, 4, 4
        t.mrope_section = [4, 6, 6]
        cfg.vision.depth, cfg.vision.out_hidden_size = 2, 256
    cfg.text.max_position_embeddings = max(cfg.text.max_position_embeddings, args.long_seq)
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
    """The same weights in any model with these parameter names, however sharded: each full tensor drawn
    on the device from a generator seeded by its name, each rank keeping its shard (init_weights draws on
    the CPU: minutes for billions)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for name, p in model.named_parameters():
        if p.dim() == 1:
            full = torch.full(p.shape, 1.0 if "norm" in name and name.endswith("weight") else 0.0)  # norms 1, biases 0
        else:
            g = torch.Generator(device=p.device).manual_seed(seed + zlib.crc32(name.encode()))
            full = torch.empty(p.shape, device=p.device).normal_(0.0, std, generator=g)
        if isinstance(p, DTensor):
            p.to_local().copy_(distribute_tensor(full.to(p.device), p.device_mesh, p.placements,
                                                 src_data_rank=None).to_local())
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


def missing(mode: Mode) -> str | None:
    if mode.needs and importlib.util.find_spec(mode.needs) is None:
        return f"waiting: {mode.needs} is not in this checkout"
    return None


def run_mode(mode: Mode, cfg, args, device, batch, r: dict) -> None:
    """Build mmtune's model for `mode` as `mmtune train` does and time it; results into `r`."""
    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.distributed.compile import compile_counters
    from mmtune.distributed.context_parallel import ContextParallel
    from mmtune.distributed.parallelize import materialize, parallelize, unshard_lm_head
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
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
    with torch.device("meta"):
        model = Glm4vMoeForConditionalGeneration(cfg)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)  # the recipe's default: vision encoder and projector frozen
    bf16 = device.type == "cuda"
    opts = FSDPOptions(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None,
                       torch_compile=mode.compile, compile_backend=args.compile_backend)
    parallelize(model, env.mesh, opts, device, cp_mesh=env.dims.cp_mesh, expert_mesh=expert_mesh)
    materialize(model, device)
    init_by_name(model, cfg.text.initializer_range)
    r["params"] = sum(p.numel() for p in model.parameters())
    window = [(batch["labels"], batch["cu_seqlens"])]

    def fwd_bwd():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                    return_logits=False, run_vision_without_images=True)
        ctx = LossContext.for_window("per_token_loss", window, group=dp_group)
        lo = lm_loss(out.hidden_states, unshard_lm_head(model), batch["labels"], ctx, cu_seqlens=batch["cu_seqlens"],
                     compute_mode="chunk", chunk_size=args.chunk_size, cp=cp)
        lo.loss_for_backward.backward()
        model.zero_grad(set_to_none=True)
        return lo.loss_value

    t0 = time.perf_counter()
    first = fwd_bwd().double()
    r["first_step_s"] = time.perf_counter() - t0  # with compile: mostly compiling
    torch.distributed.all_reduce(first)  # each cp rank holds its tokens' part of the loss
    r["first_loss"] = float(first)
    if mode.compile:
        r["compile"] = compile_counters()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    r["fwd_bwd_s"], r["fwd_bwd_best_s"] = timed(fwd_bwd, device, args.warmup, args.steps)
    if device.type == "cuda":
        r["fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if mode.compile:
        r["compile_after_timing"] = compile_counters()  # the same frames: the timed steps did not recompile
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
        r["step_s"], r["step_best_s"] = timed(lambda: trainer.train_step([batch]), device, args.warmup, args.steps)
        if device.type == "cuda":
            r["step_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del opt, sched, trainer
    del model
    if mode.compile:
        torch._dynamo.reset()  # the compiled graphs' caches must not keep this model's memory for the next mode
    _free(device)


def run_hf(cfg, args, device, batch, r: dict) -> None:
    import transformers

    hf_cfg = transformers.Glm4vMoeConfig.from_dict(cfg.to_dict())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = transformers.Glm4vMoeForConditionalGeneration._from_config(hf_cfg, dtype=dtype,
                                                                            attn_implementation="sdpa")
    model.set_experts_implementation("grouped_mm")  # transformers' fastest, on the CPU too (docs/PERFORMANCE.md)
    init_by_name(model, cfg.text.initializer_range)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    model.train()
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


def table(res: dict) -> str:
    rows = ["| mode | mmtune tokens/s | transformers tokens/s | ratio | vs eager (step) | MFU (measured peak) | "
            "step s | peak GiB | first loss mmtune / transformers | note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in res["modes"].items():
        hf = {} if m.get("waiting") else res["hf"].get(str(m.get("seq_key")), {})
        f = lambda v, spec: format(v, spec) if isinstance(v, (int, float)) else "-"  # noqa: E731
        note = m.get("waiting") or m.get("error") or (f"compile {m['first_step_s']:.0f} s" if "compile" in m else "")
        rows.append(f"| {name} | {f(m.get('tokens_per_s'), '.0f')} | {f(hf.get('tokens_per_s'), '.0f')} | "
                    f"{f(m.get('ratio_vs_hf'), '.2f')} | {f(m.get('vs_eager', {}).get('step'), '.2f')} | "
                    f"{f(m.get('mfu_vs_measured'), '.1%')} | {f(m.get('step_s'), '.3f')} | "
                    f"{f(m.get('step_peak_gib', m.get('fwd_bwd_peak_gib')), '.1f')} | "
                    f"{f(m.get('first_loss'), '.4f')} / {f(hf.get('first_loss'), '.4f')} | {note} |")
    return "\n".join(rows)


def main(argv=None) -> int:
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
    from mmtune.train.metrics import text_flops_per_token

    cfg = build_config(args)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak(device)
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "moe_layers": args.moe_layers, "bs": args.bs, "seq": args.seq, "long_seq": args.long_seq,
           "context_parallel_size": cp, "expert_model_parallel_size": ep, "world_size": world,
           "matmul_tflops": peak / 1e12 if peak else None, "paths": paths_taken(device, dtype), "modes": {}, "hf": {}}
    t_start = time.perf_counter()
    batches = {}
    for mode in args.mode_list:
        bs, seq = (1, args.long_seq) if mode.long else (args.bs, args.seq)
        key = f"{bs}x{seq}"
        r = res["modes"][mode.name] = {"what": mode.what, "seq_key": key}
        wait = missing(mode)
        if wait:
            r["waiting"] = wait
            print(f"{mode.name}: {wait}", flush=True)
            continue
        if key not in batches:  # the ranks of a cp group share a row; every other rank has its own tokens
            batches[key] = make_batch(cfg, bs, seq, device, seed=int(os.environ["RANK"]) // cp)
            if not args.skip_hf and rank0:
                hf = res["hf"][key] = {}
                _guarded(lambda: run_hf(cfg, args, device, batches[key], hf), hf, device)
        print(f"{mode.name}: {mode.what}", flush=True)
        _guarded(lambda: run_mode(mode, cfg, args, device, batches[key], r), r, device)
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
