"""Peak memory and time of `mmtune convert` (both directions) against `cp -r` of the same files.

Generates a hub-layout GLM-4.5V checkpoint of real widths (hidden 4096, moe_intermediate 1408, dense
intermediate 10944, vision 1536 -> 4096) with few layers and experts (>= 3 GB by default), then runs,
each in its own subprocess, measured with os.wait4 (peak RSS of that process, wall time):
  cp -r HF COPY;  mmtune convert hf-to-dcp;  mmtune convert dcp-to-hf
and prints peak RSS / model size and time / copy time, both until the command exits and until its
data is on disk (`sync` after it; the converters fsync their files, cp does not). Targets (issue 3):
RSS <= 0.4x, time <= 4x. Inputs come from the page cache in every step (they were just written).

    python bench/convert_memory.py [--experts 16] [--moe-layers 4] [--workdir /tmp/convert_bench] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
# The measuring process never imports torch and the checkpoint is generated in a child of its own:
# a child's ru_maxrss counts what it inherited at fork, so the parent must stay small.


def bench_config(experts: int, moe_layers: int):
    from mmtune.models.glm4v_moe.config import glm45v_config

    cfg = glm45v_config()  # real widths; fewer layers, experts, vision blocks and a smaller vocab
    cfg.text = dataclasses.replace(cfg.text, num_hidden_layers=1 + moe_layers, n_routed_experts=experts,
                                   num_experts_per_tok=min(8, experts), vocab_size=32768, num_nextn_predict_layers=0)
    cfg.vision = dataclasses.replace(cfg.vision, depth=2)
    return cfg


def write_checkpoint(cfg, out: Path, shard_bytes: int = 2 * 10**9) -> int:
    """Hub-layout safetensors (bf16, router fp32) in shards of ~shard_bytes; returns total bytes."""
    import torch

    from mmtune.weights.safetensors_io import write_file
    from mmtune.models.glm4v_moe.checkpoint_names import StateDictAdapter

    out.mkdir(parents=True)
    cfg.save_pretrained(out)
    adapter = StateDictAdapter(cfg)
    g = torch.Generator().manual_seed(0)
    block = torch.randn(16 * 2**20, generator=g)  # tiled: distinct enough, fast to make

    def tensor(shape, dtype):
        n = 1
        for s in shape:
            n *= s
        reps = -(-n // block.numel())
        return block.repeat(reps)[:n].reshape(shape).to(dtype)

    plan = []
    for name, shape in adapter.shapes.items():
        fp32 = name.endswith(("mlp.gate.weight", "e_score_correction_bias"))
        plan += [(n, torch.float32 if fp32 else torch.bfloat16, s) for n, s in adapter.hub_names_and_shapes(name, shape)]
    shards, size = [[]], 0
    for item in plan:
        nbytes = item[1].itemsize * torch.Size(item[2]).numel()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_file(out / file, shard, ((n, tensor(s, d)) for n, d, s in shard))
        weight_map.update((n, file) for n, _, _ in shard)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


PY_COPY = """
import os, sys
src, dst = sys.argv[1:3]
os.mkdir(dst)
buf = memoryview(bytearray(64 << 20))
for name in sorted(os.listdir(src)):
    with open(os.path.join(src, name), "rb", buffering=0) as f, open(os.path.join(dst, name), "wb") as g:
        while n := f.readinto(buf):
            g.write(buf[:n])
        g.flush()
        os.fsync(g.fileno())
"""


def run(cmd: list[str]) -> tuple[float, float, float]:
    """(wall seconds, wall seconds until the data is on disk, peak RSS bytes) of a subprocess. Dirty pages
    of earlier steps are flushed first (untimed), so no step pays for another's writeback."""
    subprocess.run(["sync"], check=True)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}")
    subprocess.run(["sync"], check=True)
    durable = time.perf_counter() - t0
    return wall, durable, usage.ru_maxrss * 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16, help="routed experts per MoE layer (default 16)")
    p.add_argument("--moe-layers", type=int, default=4, help="MoE decoder layers (plus 1 dense; default 4)")
    p.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the generated files")
    p.add_argument("--generate-only", metavar="DIR", help=argparse.SUPPRESS)  # internal: the generating child
    args = p.parse_args()
    if args.generate_only:
        print(write_checkpoint(bench_config(args.experts, args.moe_layers), Path(args.generate_only)))
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="convert_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        t0 = time.perf_counter()
        gen = [sys.executable, __file__, "--generate-only", str(work / "hf"),
               "--experts", str(args.experts), "--moe-layers", str(args.moe_layers)]
        size = int(subprocess.run(gen, check=True, capture_output=True, text=True).stdout.split()[-1])
        print(f"checkpoint: {size / GB:.2f} GB hub layout ({args.moe_layers} MoE layers x {args.experts} experts, "
              f"hidden 4096), written in {time.perf_counter() - t0:.0f} s")
        py = [sys.executable, "-m", "mmtune", "convert"]
        results = {
            "cp -r": run(["cp", "-r", str(work / "hf"), str(work / "copy")]),
            # a user-space streaming copy (read into a buffer, write, fsync): what any converter pays at least
            "py copy": run([sys.executable, "-c", PY_COPY, str(work / "hf"), str(work / "pycopy")]),
            "hf-to-dcp": run([*py, "hf-to-dcp", "--hf-dir", str(work / "hf"), "--save-dir", str(work / "dcp"), "--no-progress"]),
            "dcp-to-hf": run([*py, "dcp-to-hf", "--hf-dir", str(work / "hf"), "--dcp-dir", str(work / "dcp"),
                              "--save-dir", str(work / "out"), "--no-progress"]),
        }
        base, base_sync = results["cp -r"][:2]
        print(f"{'step':<10} {'wall s':>7} {'x cp':>6} {'+sync s':>8} {'x cp+sync':>9} {'peak RSS GB':>12} {'RSS/size':>9}")
        for name, (wall, durable, rss) in results.items():
            print(f"{name:<10} {wall:7.1f} {wall / base:6.2f} {durable:8.1f} {durable / base_sync:9.2f} "
                  f"{rss / GB:12.2f} {rss / size:9.3f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
