"""Expert parallelism next to FSDP only, side by side in one torchrun job on gloo (CPU): the same model, the
same batches, steps interleaved (FSDP, EP, FSDP, EP, ...) so that a shared machine slows both alike.

Model: the 9M-param CPU GLM-4.5V of bench/model_step_cpu.py (text 256 wide, 1 dense + 3 MoE layers of 16 experts top-4;
vision 2 blocks, frozen), fp32, text-only batches of BS x SEQ tokens per rank, per_token_loss, AdamW.

Printed per optimizer step and rank (medians over the timed steps; best = fastest step):
  * step seconds, and the seconds spent inside the all-to-alls (EP: counts and rows, forward, recompute
    and backward);
  * bytes this rank sends, by collective: all-gather (FSDP unshard), reduce-scatter (gradients),
    all-reduce (loss totals, grad norm), all-to-all (token dispatch, counts included) — counted by wrapping
    torch.distributed's functions, as a ring sends them ((n-1)/n of a gather / scatter's data, 2(n-1)/n
    of an all-reduce's, the remote split sizes of an all-to-all);
  * `mmtune plan`'s prediction of the routed experts' bytes for the same layout (`plan.communication`);
  * both runs' losses (the same batches: they must agree to ~1e-6).

    flock /tmp/mmtune-bench.lock torchrun --nproc_per_node 4 bench/expert_parallel.py            # EP=4
    flock /tmp/mmtune-bench.lock torchrun --nproc_per_node 4 bench/expert_parallel.py --ep 2 --steps 8
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/expert_parallel.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--ep", type=int, default=None, help="expert-parallel size (default: the world size)")
    p.add_argument("--bs", type=int, default=2, help="rows per rank per micro-batch (default 2)")
    p.add_argument("--seq", type=int, default=512, help="tokens per row (default 512)")
    p.add_argument("--steps", type=int, default=6, help="timed steps per mode (default 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first (default 2)")
    return p.parse_args(argv)


class Tally:
    """Bytes sent per collective kind, counted by wrapping torch.distributed's functions, and the seconds
    spent in the (synchronous) all-to-alls."""

    def __init__(self):
        self.bytes = defaultdict(float)
        self.a2a_s = 0.0
        self.active = False

    def install(self) -> None:
        def counted(name, count):
            orig = getattr(dist, name)

            def wrapper(*args, **kwargs):
                if not self.active:
                    return orig(*args, **kwargs)
                self.bytes[name] += count(*args, **kwargs)
                t0 = time.perf_counter()
                try:
                    return orig(*args, **kwargs)
                finally:
                    if name == "all_to_all_single":
                        self.a2a_s += time.perf_counter() - t0

            setattr(dist, name, wrapper)

        def size(group):
            return dist.get_world_size(group)

        counted("all_gather_single", lambda out, inp, group=None, **k:
                inp.numel() * inp.element_size() * (size(group) - 1))
        counted("reduce_scatter_single", lambda output=None, input=None, op=None, group=None, **k:
                input.numel() * input.element_size() * (size(group) - 1) / size(group))
        counted("all_reduce", lambda t, op=None, group=None, **k:
                2 * t.numel() * t.element_size() * (size(group) - 1) / size(group))

        def a2a(out, inp, out_splits=None, in_splits=None, group=None, **k):
            n = size(group)
            me = dist.get_rank(group)
            row = inp[0].numel() * inp.element_size() if inp.dim() > 1 and inp.shape[0] else inp.element_size()
            splits = in_splits if in_splits is not None else [inp.shape[0] // n] * n
            return sum(s for r, s in enumerate(splits) if r != me) * row

        counted("all_to_all_single", a2a)

    @contextmanager
    def counting(self):
        self.active = True
        try:
            yield
        finally:
            self.active = False


def build(cfg, env, ep: int):
    from dataclasses import replace

    from mmtune.distributed import FSDPOptions
    from mmtune.distributed.parallel_dims import ParallelDims
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.train.optim import build_optimizer, build_scheduler

    env = replace(env, dims=ParallelDims(env.world_size, ep=ep).build_meshes("cpu"))
    torch.manual_seed(0)
    model = build_model(Glm4vMoeForConditionalGeneration, cfg, env, FSDPOptions(activation_checkpointing=True),
                        FreezeSpec(vision_encoder=True, vision_projector=True, text_decoder=False), seed=0)
    opt = build_optimizer(model, lr=1e-4, weight_decay=0.0)
    sched = build_scheduler(opt, lr=1e-4, min_lr=0.0, warmup_iters=0, decay_iters=10**6, decay_style="constant")
    return env, model, opt, sched


def main(argv=None) -> int:
    args = parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        print("run under torchrun: torchrun --nproc_per_node 4 bench/expert_parallel.py", file=sys.stderr)
        return 2
    from gpu_train import build_config, make_batch

    from mmtune.distributed import init_distributed
    from mmtune.plan import communication, count_params, build_meta_model
    from mmtune.train.trainer import LoopSettings, Trainer

    torch.set_num_threads(1)
    env = init_distributed("cpu")
    ep = args.ep or env.world_size
    cfg = build_config(argparse.Namespace(dry_run=False, cpu=True, moe_layers=3))
    batch = make_batch(cfg, args.bs, args.seq, torch.device("cpu"))
    g = torch.Generator().manual_seed(1 + env.rank)  # different tokens on every rank
    batch["input_ids"] = torch.randint(0, 400, batch["input_ids"].shape, generator=g)
    batch["labels"][:, :-1] = batch["input_ids"][:, 1:]
    tally = Tally()
    tally.install()
    runs = {}
    for name, size in (("fsdp", 1), ("ep", ep)):
        run_env, model, opt, sched = build(cfg, env, size)
        s = LoopSettings(train_iters=10**6, grad_accum_steps=1, loss_type="per_token_loss", clip_grad=1.0)
        runs[name] = {"trainer": Trainer(s, run_env, model, opt, sched, [batch]), "times": [], "a2a_s": [],
                      "bytes": defaultdict(list), "losses": []}
    for i in range(args.warmup + args.steps):
        for name, r in runs.items():
            dist.barrier()
            tally.bytes.clear()
            tally.a2a_s = 0.0
            t0 = time.perf_counter()
            with tally.counting():
                result = r["trainer"].train_step([batch])
            dt = time.perf_counter() - t0
            r["losses"].append(result.loss)
            if i >= args.warmup:
                r["times"].append(dt)
                r["a2a_s"].append(tally.a2a_s)
                for k, v in tally.bytes.items():
                    r["bytes"][k].append(v)
    params = count_params(build_meta_model(cfg))
    tokens = args.bs * args.seq
    plan = {name: communication(cfg, params, gpus=env.world_size, ep=size, tokens=tokens, compute_dtype="fp32",
                                frozen=("vision_encoder", "vision_projector"))
            for name, size in (("fsdp", 1), ("ep", ep))}
    if env.rank == 0:
        out = {"world": env.world_size, "ep_size": ep, "tokens_per_rank": tokens, "params": params.total,
               "expert_params": params.experts}
        for name, r in runs.items():
            out[name] = {"step_s": statistics.median(r["times"]), "best_step_s": min(r["times"]),
                         "a2a_s": statistics.median(r["a2a_s"]),
                         "bytes": {k: statistics.median(v) for k, v in r["bytes"].items()},
                         "plan_expert_bytes": plan[name], "losses": r["losses"]}
        out["speedup_median"] = out["fsdp"]["step_s"] / out["ep"]["step_s"]
        out["speedup_best"] = out["fsdp"]["best_step_s"] / out["ep"]["best_step_s"]
        pairs = zip(runs["fsdp"]["losses"], runs["ep"]["losses"])
        out["max_loss_rel_diff"] = max(abs(a - b) / abs(a) for a, b in pairs)
        _print(out)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"]).mkdir(parents=True, exist_ok=True)
            (Path(os.environ["OUT"]) / "expert_parallel.json").write_text(json.dumps(out, indent=1))
    dist.destroy_process_group()
    return 0


def _print(out: dict) -> None:
    mib = 2**20
    print(f"world {out['world']} ranks (gloo, CPU), EP={out['ep_size']}, {out['tokens_per_rank']} tokens per rank "
          "per step; "
          f"{out['params']:,} params of which routed experts {out['expert_params']:,}")
    print(f"{'per step, rank 0':34s} {'FSDP only':>12s} {'EP':>12s}")
    f, e = out["fsdp"], out["ep"]
    print(f"{'step seconds (median)':34s} {f['step_s']:12.3f} {e['step_s']:12.3f}")
    print(f"{'step seconds (best)':34s} {f['best_step_s']:12.3f} {e['best_step_s']:12.3f}")
    print(f"{'  of which in all-to-alls':34s} {f['a2a_s']:12.3f} {e['a2a_s']:12.3f}")
    for key in sorted(set(f["bytes"]) | set(e["bytes"])):
        print(f"{'MiB sent: ' + key:34s} {f['bytes'].get(key, 0) / mib:12.2f} {e['bytes'].get(key, 0) / mib:12.2f}")
    for key in f["plan_expert_bytes"]:
        print(f"{'MiB plan, experts: ' + key.split(' (')[0][:15]:34s} {f['plan_expert_bytes'][key] / mib:12.2f} "
              f"{e['plan_expert_bytes'][key] / mib:12.2f}")
    print(f"speedup EP over FSDP only: median {out['speedup_median']:.2f}x, best {out['speedup_best']:.2f}x; "
          f"losses agree to {out['max_loss_rel_diff']:.1e}")


if __name__ == "__main__":
    sys.exit(main())
