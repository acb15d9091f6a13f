"""Per-rank memory of gradient accumulation under FSDP2, 2 gloo ranks on the CPU, the same global batch of 4
samples as grad-accum 1 (micro-batch 4), grad-accum 4 (micro-batch 1), and grad-accum 4 with the schedule
mmtune used before (no gradient sync until the window's last micro-batch: FSDP2 then keeps every
parameter's unsharded gradient until the window ends).

Memory is the process's RSS with every allocation of 1 MiB or more in its own mmap (MALLOC_MMAP_THRESHOLD_,
so freed tensors leave RSS at once): "peak" is the peak RSS of the first optimizer step minus the RSS just
before it (after a no-grad forward that does FSDP's one-time lazy init), "held" the largest RSS at the
start of a micro-batch's forward, i.e. what the previous micro-batches of the window left behind (their
gradients). Both are given as a fraction of the whole fp32 gradient (4 bytes x trainable parameters),
which is what the old schedule held unsharded on every rank.

    python bench/grad_accum_memory.py                        # ~20M parameters (tests/test_grad_accum_offload.py)
    python bench/grad_accum_memory.py --layers 8 --experts 32

The synthetic samples are made here (the same as tests/test_train_helpers.make_sample makes), so the bench
does not import the tests; the test imports this measurement.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
# name, micro-batch size, schedule; the old schedule runs one step (its gradient is compared), the others `steps`
SCHEDULES = (("ga1", 4, "now"), ("ga4", 1, "now"), ("ga4_no_sync", 1, "old"))


def model_config(vocab: int = 8192, hidden: int = 256, experts: int = 16, moe_intermediate: int = 384,
                 layers: int = 4):
    """The tiny GLM-4.5V-architecture config made wide: most parameters in the experts, the embedding and the
    lm head, while a 24-token micro-batch keeps the compute small (defaults: ~20M parameters)."""
    from dataclasses import replace

    from mmtune.models.glm4v_moe import tiny_config

    cfg = tiny_config()
    text = replace(cfg.text, vocab_size=vocab, hidden_size=hidden, n_routed_experts=experts,
                   moe_intermediate_size=moe_intermediate, num_hidden_layers=layers, num_attention_heads=8)
    return replace(cfg, text=text, vision=replace(cfg.vision, out_hidden_size=hidden))


def make_sample(config, seed: int, seq: int = 24, with_image: bool = True) -> dict:
    """One synthetic sample: token ids below 400, labels already shifted (the answer half), and optionally
    one image of grid [1, 4, 4] (16 patches -> 4 image tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (seq,), generator=g)
    pixel_values = grid = None
    if with_image:
        ids[2:6] = config.image_token_id
        pixel_values = torch.randn(16, config.vision.patch_dim, generator=g)
        grid = torch.tensor([[1, 4, 4]])
    labels = torch.full((seq,), -100)
    labels[seq // 2 : -1] = ids[seq // 2 + 1 :]
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "image_grid_thw": grid}


def micro_batches(samples: list[dict], mbs: int, rank: int, dp: int) -> list[dict]:
    """Rank `rank`'s micro-batches of one global batch (`samples` in order, split evenly over dp ranks),
    each of mbs equal-length rows (no padding, positions computed by the model)."""
    n = len(samples) // dp
    mine = samples[rank * n : (rank + 1) * n]
    out = []
    for i in range(0, len(mine), mbs):
        rows = mine[i : i + mbs]
        batch = {"input_ids": torch.stack([s["input_ids"] for s in rows]),
                 "labels": torch.stack([s["labels"] for s in rows]), "num_samples": len(rows)}
        if any(s["pixel_values"] is not None for s in rows):
            batch["pixel_values"] = torch.cat([s["pixel_values"] for s in rows if s["pixel_values"] is not None])
            batch["image_grid_thw"] = torch.cat([s["image_grid_thw"] for s in rows if s["image_grid_thw"] is not None])
        out.append(batch)
    return out


def _rss_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def measure(env, config, steps: int = 2) -> dict:
    """Run the three schedules on this rank (collective: every rank calls it): grad-accum 1 and 4 for `steps`
    optimizer steps (SGD), the old schedule for one. Returns bytes per schedule ("peak", "held", of the first
    step), the losses and gradient norms of each step and the trainable parameter count."""
    import mmtune.train.trainer as trainer_mod
    from mmtune.distributed import FSDPOptions
    from mmtune.distributed.parallelize import set_gradient_sync
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.train.trainer import LoopSettings, Trainer

    def no_sync_until_last(model, *, last_micro_batch):  # the schedule before reduce-scatter per micro-batch
        model.set_requires_gradient_sync(last_micro_batch)

    samples = [[make_sample(config, 300 + 8 * k + j, with_image=(j % 2 == 0)) for j in range(8)]
               for k in range(steps)]
    freeze = FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False)
    out = {"peak": {}, "held": {}, "losses": {}, "grad_norms": {}}
    gc.collect()
    gc.freeze()  # what exists now lives on: the gc.collect() before each measured step then has little to walk
    try:
        for name, mbs, schedule in SCHEDULES:
            run_steps = steps if schedule == "now" else 1
            trainer_mod.set_gradient_sync = set_gradient_sync if schedule == "now" else no_sync_until_last
            torch.manual_seed(0)
            model = build_model(Glm4vMoeForConditionalGeneration, config, env, FSDPOptions(), freeze, seed=0)
            out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, foreach=True)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
            batches = [b for k in range(run_steps) for b in micro_batches(samples[k], mbs, env.rank, 2)]
            ga = 4 // mbs
            t = Trainer(LoopSettings(train_iters=run_steps, grad_accum_steps=ga, loss_type="per_token_loss"), env,
                        model, opt, sched, batches)
            with torch.no_grad():  # FSDP's lazy init (one-time allocations) before anything is measured
                b = batches[0]
                model(input_ids=b["input_ids"], pixel_values=b.get("pixel_values"),
                      image_grid_thw=b.get("image_grid_thw"), return_logits=False, run_vision_without_images=True)
            held, base, norms = [], 0, []
            hook = model.register_forward_pre_hook(lambda m, a: held.append(_rss_bytes("VmRSS") - base))
            for step in range(run_steps):
                window = [t._next_batch() for _ in range(ga)]
                if step == 0:
                    gc.collect()  # the previous schedule's model (reference cycles) is gone before the baseline
                env.barrier()
                base = _rss_bytes("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
                    f.write("5")
                r = t.train_step(window)
                t.losses.append(r.loss)
                norms.append(r.grad_norm)
                if step == 0:
                    out["peak"][name] = _rss_bytes("VmHWM") - base
                    out["held"][name] = max(held)
                    hook.remove()
            out["losses"][name] = t.losses
            out["grad_norms"][name] = norms
            del model, opt, sched, t
    finally:
        trainer_mod.set_gradient_sync = set_gradient_sync
        gc.unfreeze()
    return out


def launch(out_json: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """torchrun 2 gloo ranks of this script with the allocator setting the RSS measurement needs."""
    from socket import socket

    with socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(Path(__file__)),
           "--out", str(out_json), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, env=env)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4, help="decoder layers (the first dense, the rest MoE)")
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    config = model_config(args.vocab, args.hidden, args.experts, args.moe_intermediate, args.layers)
    if "WORLD_SIZE" in os.environ:  # a torchrun rank
        from mmtune.distributed import init_distributed

        env = init_distributed("cpu")
        result = measure(env, config)
        if env.rank == 0:
            Path(args.out).write_text(json.dumps(result))
        return 0
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        argv = [f"--vocab={args.vocab}", f"--hidden={args.hidden}", f"--experts={args.experts}",
                f"--moe-intermediate={args.moe_intermediate}", f"--layers={args.layers}"]
        proc = launch(out, argv)
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        r = json.loads(out.read_text())
    full = 4 * r["trainable_params"]
    print(f"FSDP2 on 2 gloo ranks, {r['trainable_params'] / 1e6:.1f}M trainable parameters, fp32; whole fp32 "
          f"gradient {full / 2**20:.1f} MiB; global batch 4 samples x 24 tokens")
    print(f"  {'schedule':<47} {'peak step RSS':>18} {'held between micro-batches':>30}")
    names = {"ga1": "grad-accum 1 (micro-batch 4)", "ga4": "grad-accum 4, reduce-scatter every micro-batch",
             "ga4_no_sync": "grad-accum 4, old: no sync until the last"}
    for k, label in names.items():
        print(f"  {label:<47} {r['peak'][k] / 2**20:8.1f} MiB {r['peak'][k] / full:5.2f}x "
              f"{r['held'][k] / 2**20:14.1f} MiB {r['held'][k] / full:5.2f}x")
    print(f"peak over grad-accum 1: now {(r['peak']['ga4'] - r['peak']['ga1']) / full:.2f}x the gradient, "
          f"old {(r['peak']['ga4_no_sync'] - r['peak']['ga1']) / full:.2f}x")
    print("losses: " + "; ".join(f"{k} {v}" for k, v in r["losses"].items()))
    print("gradient norms: " + "; ".join(f"{k} {v}" for k, v in r["grad_norms"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
