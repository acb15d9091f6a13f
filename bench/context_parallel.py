"""Context parallelism on the CPU: one long multimodal sample trained at --context-parallel-size 1, 2, 4
(gloo ranks on this machine), side by side in one run: tokens/s of the training step and memory per rank.

The model is bench/model_step_cpu.py's (a 9M-param GLM-4.5V-architecture model: text 256 wide,
4 layers, 16 experts top-4; vision 2 blocks), everything trainable, fp32, FSDP2 over the cp ranks, no
activation recompute. The sample: SEQ tokens in one row with 8 images of 8x8 patches (16 tokens each)
spread over it, labels on every text token, per_token_loss with the chunked cross-entropy.

Per cp: each rank runs one measured step under a tensor-storage tracker (the peak bytes of tensors alive
at once: parameters, gradients, activations, collectives' buffers; mmtune.plan._LiveTensorBytes), then
--steps timed training steps (forward, backward, clip, SGD). Printed per cp: median/best step seconds,
tokens/s of the cp group, the peak tensor bytes of the largest rank and its max RSS, and mmtune plan's
estimate of the same step's activations per rank. Every rank uses --threads torch threads (default 1:
on a shared 2-core machine multi-threaded ranks wait on each other's spinning threads); CP=1 then uses one
core, CP=2 two, CP=4 oversubscribes two cores. Tokens/s is per cp group; the speed figure that matters on
GPUs (one per rank) is bench/gpu_train.py --context-parallel-size.

    flock /tmp/mmtune-bench.lock python bench/context_parallel.py [--seq 16384] [--cps 1,2,4] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))


def make_sample(cfg, seq: int, images: int = 8, grid=(1, 8, 8), seed: int = 0) -> dict:
    """One row of `seq` tokens with `images` images spread evenly; positions, cu_seqlens, shifted labels."""
    from mmtune.models.glm4v_moe.rope import get_rope_index

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (seq,), generator=g)
    n = grid[0] * grid[1] * grid[2] // cfg.vision.spatial_merge_size**2
    for i in range(images):
        at = 1 + i * (seq // images)
        ids[at] = cfg.image_start_token_id
        ids[at + 1 : at + 1 + n] = cfg.image_token_id
        ids[at + 1 + n] = cfg.image_end_token_id
    grids = torch.tensor([list(grid)] * images)
    pixels = torch.randn(images * grid[0] * grid[1] * grid[2], cfg.vision.patch_dim, generator=g)
    labels = torch.full((seq,), -100)
    labels[:-1] = ids[1:]
    labels[:-1][(ids[1:] == cfg.image_token_id) | (ids[:-1] == cfg.image_token_id)] = -100
    pos, _ = get_rope_index(ids, grids, image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
                            video_end_token_id=cfg.video_end_token_id, spatial_merge_size=cfg.vision.spatial_merge_size)
    return {"input_ids": ids[None], "labels": labels[None], "position_ids": pos[:, None], "pixel_values": pixels,
            "image_grid_thw": grids, "cu_seqlens": torch.tensor([0, seq], dtype=torch.int32), "num_samples": 1}


def worker(args) -> None:
    """One rank of one cp run (under torchrun)."""
    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
    from mmtune.plan import _LiveTensorBytes
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.train.trainer import LoopSettings, Trainer
    from model_step_cpu import bench_config

    cp = int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    env = init_distributed("cpu", cp=cp)
    cfg = bench_config()
    model = build_model(Glm4vMoeForConditionalGeneration, cfg, env, FSDPOptions(),
                        FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False), seed=0)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    batch = make_sample(cfg, args.seq)
    s = LoopSettings(train_iters=10**6, grad_accum_steps=1, loss_type="per_token_loss", compute_mode="chunk",
                     chunk_size=1024, clip_grad=1.0, pad_token_id=cfg.text.pad_token_id)
    trainer = Trainer(s, env, model, opt, sched, [batch])
    tracker = _LiveTensorBytes()
    with tracker.mode:
        first = trainer.train_step([batch])
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step([batch])
        times.append(time.perf_counter() - t0)
    row = {"rank": env.rank, "loss": first.loss, "peak_tensor_bytes": tracker.peak, "times": times,
           "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    rows = [None] * cp
    torch.distributed.all_gather_object(rows, row)
    if env.rank == 0:
        Path(args.out).write_text(json.dumps(rows))
    torch.distributed.destroy_process_group()


def plan_activations(seq: int, cp: int) -> float:
    """mmtune plan's estimate of one rank's activations for the same step (fp32, no recompute)."""
    from mmtune.plan import estimate
    from model_step_cpu import bench_config

    plan = estimate(bench_config(), gpus=cp, seq_length=seq, recompute="none", compute_dtype="fp32", frozen=(),
                    image_patches=8 * 64, loss_chunk_size=1024, context_parallel_size=cp)
    return sum(b for k, b in plan.rows.items() if k.startswith("activations"))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_cp(cp: int, args) -> list[dict]:
    """torchrun this script's worker on cp ranks; the rows of every rank."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", str(cp),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, "--worker",
               "--seq", str(args.seq), "--steps", str(args.steps), "--threads", str(args.threads), "--out", str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"cp {cp} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(out.read_text())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/context_parallel.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq", type=int, default=16384, help="tokens of the one sample (default 16384)")
    p.add_argument("--cps", default="1,2,4", help="context-parallel sizes to run (default 1,2,4)")
    p.add_argument("--steps", type=int, default=2, help="timed steps per cp after the measured one (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per rank (default 1)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    cps = [int(c) for c in args.cps.split(",")]
    print(f"one sample of {args.seq} tokens (8 images of 8x8 patches), bench model, fp32, gloo, "
          f"{os.cpu_count()} CPUs; {args.threads} thread(s) per rank", flush=True)
    results = {}
    for cp in cps:
        rows = run_cp(cp, args)
        step = [statistics.median(r["times"]) for r in rows]
        best = [min(r["times"]) for r in rows]
        results[cp] = {
            "loss": rows[0]["loss"], "median_step_s": max(step), "best_step_s": max(best),
            "tokens_per_s": args.seq / max(step), "peak_tensor_bytes_max_rank": max(r["peak_tensor_bytes"] for r in rows),
            "max_rss_bytes_max_rank": max(r["max_rss_bytes"] for r in rows), "plan_activations_bytes": plan_activations(args.seq, cp),
        }
        print(f"cp {cp}: " + ", ".join(f"{k} {v:.4g}" for k, v in results[cp].items()), flush=True)
    base = results[cps[0]]
    print(f"\n{'cp':>3} {'loss':>10} {'s/step':>8} {'tokens/s':>9} {'x cp' + str(cps[0]):>7} {'peak MiB':>9} "
          f"{'x':>6} {'RSS MiB':>8} {'plan act MiB':>12}")
    for cp, r in results.items():
        print(f"{cp:>3} {r['loss']:>10.6f} {r['median_step_s']:>8.2f} {r['tokens_per_s']:>9.0f} "
              f"{r['tokens_per_s'] / base['tokens_per_s']:>7.2f} {r['peak_tensor_bytes_max_rank'] / 2**20:>9.0f} "
              f"{r['peak_tensor_bytes_max_rank'] / base['peak_tensor_bytes_max_rank']:>6.2f} "
              f"{r['max_rss_bytes_max_rank'] / 2**20:>8.0f} {r['plan_activations_bytes'] / 2**20:>12.0f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"seq": args.seq, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
