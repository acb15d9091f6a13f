"""mmtune's training step on one GPU next to transformers' Glm4vMoe on the same batch and weights
(`--arch glm4v`: the dense GLM-4.1V next to transformers' Glm4v, real width, `--layers` dense layers).

A reduced-depth, real-width GLM-4.5V (text: 1 dense + N MoE layers of 4096 wide, 128 experts top-8,
vocab 151552; vision: 1 block), bf16 compute. mmtune runs its real CUDA training path: a 1-rank NCCL
process group, FSDP2 with MixedPrecisionPolicy(param bf16, reduce fp32) over fp32 master weights, varlen
flash attention, grouped-GEMM experts, chunked lm-head cross-entropy, fused AdamW. transformers runs its
model in bf16 (grouped_mm experts, sdpa). Both do text-only batches of BS x SEQ tokens.

Printed, side by side in one run (the ratio is what to compare; absolute numbers depend on the card):
  * fwd+bwd seconds, tokens/s and MFU for both (MFU = 6*N_active*tokens + causal attention FLOPs, over
    the card's measured bf16 matmul ceiling and over the nominal 989 TFLOP/s of an H100/H200 SXM);
  * mmtune's full optimizer step (fwd+bwd + clip + fused AdamW) seconds;
  * peak memory of each, and both losses on the first batch (same weights: they must agree to bf16 noise);
  * the lm-head + cross-entropy alone in bf16 at GLM-4.5V's vocab 151552 x 8192 tokens, hidden 4096:
    peak memory added by the chunked loss (fp32 weight-gradient accumulation in place) and by the plain one,
    and whether the chunked loss used the fp32-output addmm (`loss_chunked_fp32_out_addmm`).

    python bench/gpu_train.py                  # H100/H200, about 2-4 minutes
    python bench/gpu_train.py --moe-layers 2 --seq 8192
    python bench/gpu_train.py --lora-r 16      # mmtune with LoRA (frozen bf16 base) instead of full finetuning
    python bench/gpu_train.py --save-dir /local/disk/tmp   # + checkpoint save blocked time, sync vs async
    python bench/gpu_train.py --dry-run        # CPU, tiny config, fp32, gloo: checks the script runs
    python bench/gpu_train.py --cpu            # CPU, fp32: the 7.3M-param model of docs/PERFORMANCE.md, 4 x 512
    python bench/gpu_train.py --arch glm4v     # GLM-4.1V-9B's widths, 8 of its 40 layers (about 3.8B params)

Context parallelism (one long row split over N GPUs, Ulysses): launch N ranks with torchrun, e.g.
    torchrun --nproc_per_node 4 bench/gpu_train.py --context-parallel-size 4 --bs 1 --seq 65536 --skip-hf
    torchrun --nproc_per_node 2 bench/gpu_train.py --dry-run --context-parallel-size 2   # CPU, gloo
Each rank holds seq/N tokens; tokens/s counts the group's tokens, MFU is per GPU, peak memory is rank 0's.
transformers runs on one device: with N > 1 only the --dry-run runs it (on rank 0, to check the loss).

Expert parallelism (one node of N GPUs): mmtune with FSDP over all N GPUs next to mmtune with EP (each GPU
owns E/EP experts of every MoE layer, tokens by all-to-all), each GPU its own batch, side by side
(`speedup_*_ep{EP}_over_fsdp`; the routing balance of the initial weights in `*_moe_load_max_mean`);
transformers is skipped. tokens/s count every GPU's tokens.
    torchrun --nproc_per_node 8 bench/gpu_train.py --expert-model-parallel-size 8 --moe-layers 4
    torchrun --nproc_per_node 4 bench/gpu_train.py --dry-run --expert-model-parallel-size 2   # CPU, gloo

Environment knobs are flags; results also go to $OUT/gpu_train.json when OUT is set.
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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/gpu_train.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--moe-layers", type=int, default=1, help="MoE decoder layers after the dense one (default 1; "
                   "each adds 2.2B params — with fp32 AdamW state 3 layers do not fit 80 GB)")
    p.add_argument("--arch", choices=["glm4v_moe", "glm4v"], default="glm4v_moe",
                   help="glm4v_moe: GLM-4.5V (default); glm4v: the dense GLM-4.1V / GLM-4.6V-Flash")
    p.add_argument("--layers", type=int, default=8, help="--arch glm4v: dense decoder layers (default 8 of the "
                   "real 40; fp32 AdamW state for all 40 needs about 154 GiB)")
    p.add_argument("--seq", type=int, default=4096, help="tokens per row (default 4096)")
    p.add_argument("--bs", type=int, default=1, help="rows per micro-batch (default 1)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per measurement (default 4)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps (default 2)")
    p.add_argument("--chunk-size", type=int, default=4096, help="chunked-loss tokens per chunk (default 4096)")
    p.add_argument("--skip-hf", action="store_true", help="do not run transformers' model")
    p.add_argument("--context-parallel-size", type=int, default=1,
                   help="split each row over this many ranks (Ulysses; launch as many with torchrun; default 1)")
    p.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="under torchrun: also run mmtune with this expert-parallel size next to FSDP only "
                        "(each rank its own batch; default 1)")
    p.add_argument("--skip-optimizer", action="store_true", help="do not time mmtune's full optimizer step")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA of this rank on every Linear of the decoder and the "
                   "routed experts (frozen base stored in bf16, fp32 adapters; implies --skip-hf)")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny config, fp32: a quick check that it runs")
    p.add_argument("--save-dir", help="also time one checkpoint save of the model + AdamW state into DIR, "
                   "synchronous and --async-save (blocked time, and the background write's total); needs ~12x the "
                   "parameter count in bytes of disk (--moe-layers 1: ~45 GB); --dry-run uses a temp dir")
    p.add_argument("--cpu", action="store_true", help="CPU, fp32, docs/PERFORMANCE.md's 7.3M-param model (text 256 wide, "
                   "4 layers, 16 experts top-4; vision 2 blocks), --bs 4 --seq 512 unless given")
    return p.parse_args(argv)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


BEST: dict[str, float] = {}  # fastest step of each measurement (closest to the uncontended cost)


def timed(fn, device, warmup: int, iters: int, name: str = "") -> float:
    """Median seconds per call; the minimum goes to BEST[name]."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    if name:
        BEST[name] = min(times)
    return statistics.median(times)


def matmul_peak(device) -> float | None:
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    t = timed(lambda: a @ b, device, 3, 10)
    return 2 * 8192**3 / t


def build_config(args):
    if args.arch == "glm4v":
        from mmtune.models.glm4v import glm41v_config, tiny_config as dense_tiny

        cfg = dense_tiny() if (args.dry_run or args.cpu) else glm41v_config()
        cfg.vision.depth = 1
        if not (args.dry_run or args.cpu):
            cfg.text.num_hidden_layers = args.layers
        if args.cpu:  # the dense model of bench/model_step_cpu.py --arch glm4v
            t = cfg.text
            t.hidden_size, t.intermediate_size, t.num_hidden_layers = 256, 1024, 4
            t.num_attention_heads, t.num_key_value_heads, t.mrope_section = 4, 2, [4, 6, 6]
            cfg.vision.depth, cfg.vision.out_hidden_size = 2, 256
        return cfg
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
    return cfg


def make_batch(cfg, args, device, seed: int = 0):
    from mmtune.tokens import TINY_SPECIAL_BASE, TINY_VOCAB_SIZE

    g = torch.Generator().manual_seed(seed)
    high = TINY_SPECIAL_BASE if cfg.text.vocab_size == TINY_VOCAB_SIZE else 150000  # no special tokens
    ids = torch.randint(0, high, (args.bs, args.seq), generator=g)
    labels = torch.full_like(ids, -100)
    labels[:, :-1] = ids[:, 1:]
    pos = torch.arange(args.seq).expand(3, args.bs, args.seq).contiguous()
    cu = torch.arange(0, args.bs * args.seq + 1, args.seq, dtype=torch.int32)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": cu, "num_samples": args.bs}
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def fast_init(model, std: float, seed: int = 0) -> None:
    """Random weights drawn on the device (init_weights draws on the CPU: minutes for billions). On the CPU
    with several ranks DTensor draws the same values on every shard (it has no distributed RNG there), so
    a dry run's routers send every token to the same experts: a stress case for EP, not a benchmark."""
    torch.manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0 if "norm" in name or "layernorm" in name else 0.0)
        else:
            p.normal_(0.0, std)
    for name, b in model.named_buffers():
        if "e_score_correction_bias" in name:
            b.zero_()


def run_mmtune(cfg, args, device, batch, res, ep: int = 1, key: str = "mmtune"):
    """Time mmtune's fwd+bwd and full optimizer step into res[f"{key}_..."]; returns the full state dict
    for transformers' run (None with --skip-hf)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.distributed.context_parallel import ContextParallel
    from mmtune.distributed.parallelize import materialize, parallelize, unshard_lm_head
    from mmtune.models import architecture_for_config
    from mmtune.train.loss import LossContext, lm_loss
    from mmtune.train.metrics import text_flops_per_token
    from mmtune.train.moe_balance import load_summary
    from mmtune.train.optim import build_optimizer, build_scheduler
    from mmtune.train.trainer import LoopSettings, Trainer

    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    env = init_distributed(device.type, cp=args.context_parallel_size, ep=ep)
    res["backend"] = torch.distributed.get_backend()
    res["world_size"] = env.world_size
    cp = ContextParallel.from_mesh(env.dims.cp_mesh)
    dp_group = env.dims.dp_mesh.get_group() if env.dims.dp_mesh is not None else None
    if cp is not None:  # every rank holds the row; the model keeps seq/cp tokens of it
        batch, _ = cp.pad_batch(batch, None, cfg.text.pad_token_id)
    with torch.device("meta"):
        model = architecture_for_config(cfg).model_class(cfg)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)  # the recipe's default: vision encoder and projector frozen
    bf16 = device.type == "cuda"
    opts = FSDPOptions(param_dtype=torch.bfloat16 if bf16 else None, reduce_dtype=torch.float32 if bf16 else None)
    if args.lora_r:  # LoRA: the frozen base stored in the compute dtype, fp32 adapters train
        from mmtune.distributed.parallelize import store_frozen_in
        from mmtune.train.freeze import FreezeSpec
        from mmtune.train.lora import LoRAConfig, apply_lora

        apply_lora(model, LoRAConfig(r=args.lora_r, alpha=2.0 * args.lora_r), FreezeSpec())
        store_frozen_in(model, opts.param_dtype)
    parallelize(model, env.mesh, opts, device, cp_mesh=env.dims.cp_mesh, expert_mesh=env.dims.expert_mesh)
    materialize(model, device)
    fast_init(model, cfg.text.initializer_range)  # adapters too: B != 0, as after training
    res["params"] = sum(p.numel() for p in model.parameters())
    res["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ctx_window = [(batch["labels"], batch["cu_seqlens"])]

    def fwd_bwd():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], cu_seqlens=batch["cu_seqlens"],
                    return_logits=False, run_vision_without_images=True)
        ctx = LossContext.for_window("per_token_loss", ctx_window, group=dp_group)
        lo = lm_loss(out.hidden_states, unshard_lm_head(model), batch["labels"], ctx, cu_seqlens=batch["cu_seqlens"],
                     compute_mode="chunk", chunk_size=args.chunk_size, cp=cp)
        lo.loss_for_backward.backward()
        model.zero_grad(set_to_none=True)
        return lo.loss_value

    first = fwd_bwd().double()
    torch.distributed.all_reduce(first)  # each cp rank holds its tokens' part of the loss
    res[f"{key}_first_loss"] = float(first)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res[f"{key}_fwd_bwd_s"] = timed(fwd_bwd, device, args.warmup, args.steps, f"{key}_fwd_bwd")
    if device.type == "cuda":
        res[f"{key}_fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    full_sd = None
    if not args.skip_hf:
        full_sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if device.type == "cpu":  # cpu_offload does not copy CPU tensors: keep these weights from the optimizer
            full_sd = {k: v.clone() for k, v in full_sd.items()}
    if not args.skip_optimizer:
        opt = build_optimizer(model, lr=1e-6, weight_decay=0.0)
        res["fused_adamw"] = bool(opt.defaults.get("fused"))
        sched = build_scheduler(opt, lr=1e-6, min_lr=0.0, warmup_iters=0, decay_iters=10**6, decay_style="constant")
        s = LoopSettings(train_iters=10**6, grad_accum_steps=1, loss_type="per_token_loss", compute_mode="chunk",
                         chunk_size=args.chunk_size, clip_grad=1.0)
        trainer = Trainer(s, env, model, opt, sched, [batch])
        load = trainer.train_step([batch]).expert_load  # routing balance of the initial weights: EP's speed
        if load is not None:                            # depends on it (1.0 = every expert equally busy)
            res[f"{key}_moe_load_max_mean"] = load_summary(load)["moe_load_max_mean"]
        res[f"{key}_step_s"] = timed(lambda: trainer.train_step([batch]), device, args.warmup, args.steps,
                                     f"{key}_step")
        if device.type == "cuda":
            res[f"{key}_step_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if args.save_dir or args.dry_run:
            time_saves(model, opt, args, res)
        del opt, sched, trainer
    res["flops_per_token"] = text_flops_per_token(cfg.text, args.seq)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return full_sd


def run_loss_memory(args, device, res):
    """Peak memory added by lm_loss forward+backward, chunked vs plain, bf16 hidden states and weight."""
    from mmtune.train.loss import LossContext, _fp32_out_addmm, lm_loss

    vocab, tokens, hidden = (151552, 8192, 4096) if device.type == "cuda" else (1000, 256, 64)
    dtype = torch.bfloat16
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(1, tokens, hidden, device=device, generator=g) * 0.5).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.02).to(dtype).requires_grad_()
    y = torch.randint(0, vocab, (1, tokens), device=device, generator=g)
    for mode in ("chunk", "default"):
        h.grad = w.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = lm_loss(h, w, y, LossContext("default"), compute_mode=mode, chunk_size=1024)
        out.loss_for_backward.backward()
        res[f"loss_{mode}_value"] = float(out.loss_value)
        if device.type == "cuda":
            res[f"loss_{mode}_peak_added_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    if device.type == "cuda":
        res["loss_chunk_over_plain_memory"] = res["loss_chunk_peak_added_gib"] / res["loss_default_peak_added_gib"]
    res["loss_chunked_fp32_out_addmm"] = _fp32_out_addmm(device)
    del h, w, y


def time_saves(model, opt, args, res) -> None:
    """Blocked time of one synchronous and one asynchronous checkpoint save (train/checkpoint.py), same state;
    on CUDA the async copy goes to pinned host memory."""
    import shutil
    import tempfile

    from mmtune.train.checkpoint import Checkpointer

    root = Path(args.save_dir) if args.save_dir else Path(tempfile.mkdtemp(prefix="gpu_train_save_"))
    try:
        for mode in ("sync", "async"):
            ck = Checkpointer(root / mode, async_save=mode == "async")
            t0 = time.perf_counter()
            ck.save(1, model, opt)
            res[f"save_{mode}_call_s"] = ck.last_blocked_s
            ck.wait_staged()  # the copy to host; the trainer overlaps it with the next forward/backward
            res[f"save_{mode}_blocked_s"] = time.perf_counter() - t0
            ck.close()
            res[f"save_{mode}_total_s"] = time.perf_counter() - t0
            shutil.rmtree(root / mode)
        res["save_async_over_sync_blocked"] = res["save_async_blocked_s"] / res["save_sync_blocked_s"]
    finally:
        if not args.save_dir:
            shutil.rmtree(root, ignore_errors=True)


def run_hf(cfg, args, device, batch, full_sd, res):
    import transformers

    from mmtune.models import architecture_for_config

    arch = architecture_for_config(cfg)
    hf_class = getattr(transformers, arch.hf_class_name)
    hf_cfg = getattr(transformers, arch.hf_class_name.replace("ForConditionalGeneration", "Config")).from_dict(cfg.to_dict())
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.device(device):
        model = hf_class._from_config(hf_cfg, dtype=dtype, attn_implementation="sdpa")
    if arch.has_experts:
        try:
            model.set_experts_implementation("grouped_mm")  # transformers' fastest on CPU too (docs/PERFORMANCE.md)
        except Exception as e:  # older transformers: the default implementation
            res["hf_experts_impl_error"] = repr(e)[:200]
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in full_sd.items()}, strict=False)
    res["hf_missing_keys"] = len(missing)
    for p in model.model.visual.parameters():
        p.requires_grad_(False)
    model.train()
    ids = batch["input_ids"]

    def fwd_bwd():  # transformers shifts the labels itself: labels=ids is mmtune's shifted batch["labels"]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss.detach()

    res["hf_first_loss"] = float(fwd_bwd())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    res["hf_fwd_bwd_s"] = timed(fwd_bwd, device, args.warmup, args.steps, "hf_fwd_bwd")
    if device.type == "cuda":
        res["hf_fwd_bwd_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    res["transformers"] = transformers.__version__


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        args.seq, args.steps, args.warmup = min(args.seq, 64), 1, 1
        device = torch.device("cpu")
    elif args.cpu:
        if "--seq" not in (argv or sys.argv):
            args.seq = 512
        if "--bs" not in (argv or sys.argv):
            args.bs = 4
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("bench/gpu_train.py needs a CUDA GPU (use --dry-run on a CPU)", file=sys.stderr)
            return 2
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    cp = args.context_parallel_size
    if cp > 1:
        if int(os.environ.get("WORLD_SIZE", "1")) != cp:
            print(f"--context-parallel-size {cp}: launch {cp} ranks with torchrun --nproc_per_node {cp}", file=sys.stderr)
            return 2
        args.skip_hf = args.skip_hf or not args.dry_run  # transformers' model runs on rank 0 alone: a CPU check
    ep = args.expert_model_parallel_size
    if ep > 1:
        if "LOCAL_RANK" not in os.environ or int(os.environ["WORLD_SIZE"]) % ep:
            print(f"--expert-model-parallel-size {ep}: launch a multiple of {ep} ranks with torchrun "
                  f"--nproc_per_node", file=sys.stderr)
            return 2
        args.skip_hf = True
    rank0 = int(os.environ.get("RANK", "0")) == 0
    res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "arch": args.arch, "seq": args.seq, "bs": args.bs, "context_parallel_size": cp}
    res.update({"moe_layers": args.moe_layers} if args.arch == "glm4v_moe" else {"layers": args.layers})
    cfg = build_config(args)
    peak = matmul_peak(device)
    res["matmul_tflops"] = peak / 1e12 if peak else None
    # the ranks of a cp group share a row; each data-parallel rank (EP runs: every rank) has its own tokens
    batch = make_batch(cfg, args, device, seed=int(os.environ.get("RANK", "0")) // cp)
    own_group = not torch.distributed.is_initialized()  # a caller's process group is left as it was
    full_sd = run_mmtune(cfg, args, device, batch, res)
    if ep > 1:
        run_mmtune(cfg, args, device, batch, res, ep=ep, key=f"mmtune_ep{ep}")
    if own_group:
        torch.distributed.destroy_process_group()
    if rank0:
        run_loss_memory(args, device, res)
    if not args.skip_hf and rank0 and not args.lora_r:
        run_hf(cfg, args, device, batch, full_sd, res)
    world = res["world_size"]
    tokens = args.bs * args.seq * world // cp  # every data-parallel rank's row(s)
    flops = res["flops_per_token"] * tokens
    for who in ("mmtune", "hf", f"mmtune_ep{ep}"):
        t = res.get(f"{who}_fwd_bwd_s")
        if t:
            res[f"{who}_tokens_per_s"] = tokens / t  # of all ranks
            if peak:  # per GPU: all ranks' FLOPs over the GPUs
                res[f"{who}_mfu_vs_measured"] = flops / t / peak / world
                res[f"{who}_mfu_vs_989"] = flops / t / 989e12 / world
    res.update({f"best_{k}_s": v for k, v in BEST.items()})
    if res.get("hf_fwd_bwd_s") and res.get("mmtune_fwd_bwd_s"):
        res["speedup_fwd_bwd_mmtune_over_hf"] = res["hf_fwd_bwd_s"] / res["mmtune_fwd_bwd_s"]
        res["speedup_best_fwd_bwd_mmtune_over_hf"] = BEST["hf_fwd_bwd"] / BEST["mmtune_fwd_bwd"]
    if ep > 1:  # the target on a GPU node: EP >= 1.3x the tokens/s of FSDP only at the same batch
        for what in ("fwd_bwd", "step"):
            if f"mmtune_ep{ep}_{what}_s" in res:
                res[f"speedup_{what}_ep{ep}_over_fsdp"] = res[f"mmtune_{what}_s"] / res[f"mmtune_ep{ep}_{what}_s"]
                res[f"speedup_best_{what}_ep{ep}_over_fsdp"] = BEST[f"mmtune_{what}"] / BEST[f"mmtune_ep{ep}_{what}"]
    if not rank0:
        return 0
    for k, v in res.items():
        print(f"{k:32s} {v:.4g}" if isinstance(v, float) else f"{k:32s} {v}", flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
        (Path(os.environ["OUT"]) / "gpu_train.json").write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
