"""Time the training loop is blocked per checkpoint save: synchronous vs `--async-save`, same run.

The CPU bench model (bench/model_step_cpu.py's config: text 256 wide, 4 layers, 16 experts) trains with
AdamW in one process; every `--every` steps the Checkpointer saves model + optimizer + RNG state. Blocked
time = how long `Checkpointer.save` holds the loop, plus for async saves how long the next optimizer step
then waits for the copy into the staging buffer (`wait_staged`, as the trainer calls it) — the copy runs
during the next forward and backward; a save also waits for the previous one if that is still writing.
Write time = how long each checkpoint took to be complete (sync: the blocked time; async: in the background,
from the end of `save()` until published). Sync and async runs alternate (`--rounds` pairs) so that machine
noise hits both; medians and best figures are printed, with the mean step time of each run (the background
writer shares the CPU with training). Target (issue 10): async <= 0.25x sync.

    python bench/async_save.py [--rounds 3] [--steps 12] [--every 2] [--batch 2] [--seq 256]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from model_step_cpu import bench_config, make_batch  # noqa: E402

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration  # noqa: E402
from mmtune.train.checkpoint import Checkpointer, TrainState  # noqa: E402


def run(mode: str, args, save_dir: Path) -> tuple[list[float], list[float], float, int]:
    """(blocked seconds per save, write seconds per save, mean step seconds, checkpoint bytes) of one run."""
    torch.manual_seed(0)
    cfg = bench_config()
    model = Glm4vMoeForConditionalGeneration(cfg)
    model.init_weights(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids, pixels, grids, labels = make_batch(cfg, args.batch, args.seq)
    ck = Checkpointer(save_dir, async_save=mode == "async")
    blocked, steps = [], []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        out = model(ids, pixel_values=pixels, image_grid_thw=grids)
        F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten()).backward()
        waited = ck.staging_wait_s
        ck.wait_staged()  # as the trainer does: an async copy of the weights completes before they change
        if blocked:
            blocked[-1] += ck.staging_wait_s - waited
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps.append(time.perf_counter() - t0)
        if step % args.every == 0:
            ck.save(step, model, opt, None, None, TrainState(step=step))
            blocked.append(ck.last_blocked_s)
    ck.close()
    size = sum(p.stat().st_size for p in (save_dir / f"iter_{args.steps:07d}").iterdir())
    written = [ck.written_s[s] for s in sorted(ck.written_s)]
    return blocked, written, statistics.mean(steps), size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="sync/async run pairs (default 3)")
    p.add_argument("--steps", type=int, default=12, help="training steps per run (default 12)")
    p.add_argument("--every", type=int, default=2, help="save every N steps (default 2)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="async_save_bench_"))
    results: dict[str, dict[str, list[float]]] = {m: {"blocked": [], "written": [], "step": []}
                                                   for m in ("sync", "async")}
    size = 0
    try:
        for r in range(args.rounds):
            for mode in ("sync", "async"):
                blocked, written, step, size = run(mode, args, work / f"{mode}_{r}")
                results[mode]["blocked"] += blocked[1:]  # the first save allocates the staging buffer
                results[mode]["written"] += written[1:]
                results[mode]["step"].append(step)
                shutil.rmtree(work / f"{mode}_{r}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"checkpoint {size / 1e6:.1f} MB (model + AdamW state), {args.steps} steps, a save every {args.every}; "
          f"{args.rounds} rounds; torch threads {torch.get_num_threads()}")
    print("write = how long a save took to be complete (sync: the blocked time itself; async: in the background, "
          "from the end of save() until published)")
    print(f"{'mode':<6} {'blocked/save median':>20} {'best':>8} {'write median':>13} {'best':>8} {'saves':>6} "
          f"{'mean step s':>12}")
    med = {}
    for mode, r in results.items():
        med[mode] = statistics.median(r["blocked"])
        print(f"{mode:<6} {med[mode] * 1e3:17.1f} ms {min(r['blocked']) * 1e3:6.1f}ms "
              f"{statistics.median(r['written']) * 1e3:10.1f} ms {min(r['written']) * 1e3:6.1f}ms "
              f"{len(r['blocked']):6d} {statistics.median(r['step']):12.3f}")
    best = min(results["async"]["blocked"]) / min(results["sync"]["blocked"])
    print(f"async / sync blocked time: median {med['async'] / med['sync']:.3f}, best {best:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
