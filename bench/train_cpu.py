"""`mmtune train` on the CPU under several thread / loader-worker settings, side by side: median step time
and the share of it spent waiting for data (metrics.jsonl `data_wait_s`), same data, same seed.

The setup is the demo's (tiny GLM-4.5V, shapes VQA, batch 16, 256-token rows, examples/tiny/ configs), made
once in --workdir; the data.json leaves `num_workers` out so that the automatic choice can apply. Settings
(each a separate `mmtune train` process, rounds interleaved so machine noise hits all alike):

  before     torch's and the old defaults: 2 loader workers, one intra-op thread per core
  auto       no flags: threads and workers chosen from the cores (mmtune/train/cores.py)
  0-workers  auto threads, data loaded in the training process
  compiled   auto + --use-torch-compile (its compile steps are left out of the median, reported apart)

    python bench/train_cpu.py [--steps 60] [--rounds 2] [--settings before,auto,0-workers]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SETTINGS = {
    "before": ["--num-workers", "2", "--num-threads", str(os.cpu_count() or 1)],
    "auto": [],
    "0-workers": ["--num-workers", "0"],
    "compiled": ["--use-torch-compile"],
}


def prepare(workdir: Path) -> tuple[Path, Path, Path]:
    from mmtune.convert.hf_to_dcp import hf_to_dcp
    from mmtune.data.llava import llava_to_mllm
    from mmtune.data.shapes import make_shapes
    from mmtune.demo import write_recipe_configs
    from mmtune.tiny import make_tiny

    hf_dir, data_dir, dcp = workdir / "GLM-4.5V-tiny", workdir / "data", workdir / "dcp"
    if not (workdir / "model.json").is_file():
        make_tiny(hf_dir, seed=0)
        make_shapes(data_dir, num=2000, seed=0)
        llava_to_mllm(data_dir / "llava_format.json", data_dir / "mllm.json", image_dir=data_dir)
        hf_to_dcp(hf_dir, dcp, progress=False)
        data_json, model_json = write_recipe_configs(workdir, hf_dir, data_dir, "mllm.json")
        data = json.loads(data_json.read_text())
        data["dataloader_param"].pop("num_workers")  # the automatic choice applies unless a flag is given
        data_json.write_text(json.dumps(data, indent=4))
    return workdir / "data.json", workdir / "model.json", dcp


def run(name: str, data_json: Path, model_json: Path, dcp: Path, save: Path, steps: int) -> dict:
    cmd = [sys.executable, "-m", "mmtune", "train", "--mm-data", str(data_json), "--mm-model", str(model_json),
           "--load", str(dcp), "--metrics-file", str(save / "metrics.jsonl"), "--micro-batch-size", "16",
           "--train-iters", str(steps), "--lr", "5e-4", "--lr-warmup-iters", "5", "--seed", "0", "--log-interval", "1",
           "--seq-length", "256", *SETTINGS[name]]
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # as a plain shell would
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**env, "HF_HUB_OFFLINE": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    steady = [r for r in rows[5:] if not r.get("compiling")]
    choice = next((line.split(": ", 1)[1] for line in proc.stdout.splitlines() if "intra-op thread" in line), "?")
    return {"median_step_s": statistics.median(r["step_time_s"] for r in steady),
            "data_wait_frac": sum(r["data_wait_s"] for r in steady) / sum(r["step_time_s"] for r in steady),
            "compile_steps_s": sum(r["step_time_s"] for r in rows if r.get("compiling")),
            "wall_s": wall, "last_loss": rows[-1]["loss"], "choice": choice}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/train_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/mmtune_bench_train_cpu", help="setup made once here")
    p.add_argument("--steps", type=int, default=60, help="training steps per run (default 60)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every setting (default 2)")
    p.add_argument("--settings", default="before,auto,0-workers", help=f"comma-separated from {list(SETTINGS)}")
    args = p.parse_args(argv)
    names = args.settings.split(",")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_json, model_json, dcp = prepare(workdir)
    results: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(args.rounds):
        for name in names:
            save = workdir / f"run_{name}_{r}"
            save.mkdir(exist_ok=True)
            (save / "metrics.jsonl").unlink(missing_ok=True)
            results[name].append(run(name, data_json, model_json, dcp, save, args.steps))
            print(name, r, results[name][-1], flush=True)
    print(f"\n{args.steps} steps of batch 16 x <=256 tokens, {os.cpu_count()} cores, medians over {args.rounds} rounds")
    print("| setting | threads / workers | median step s | data wait (share of step) | compile steps s | last loss |")
    print("|---|---|---|---|---|---|")
    for name in names:
        rs = results[name]
        med = statistics.median(x["median_step_s"] for x in rs)
        wait = statistics.median(x["data_wait_frac"] for x in rs)
        comp = statistics.median(x["compile_steps_s"] for x in rs)
        print(f"| {name} | {rs[0]['choice'].split(' per rank')[0]} | {med:.4f} | {100 * wait:.1f}% | {comp:.1f} | "
              f"{rs[-1]['last_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
