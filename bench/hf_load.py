"""Training straight from the HF download (`--load HF_DIR`) against the recipe's convert-then-load, on 2 ranks.

Generates the hub-layout real-width checkpoint of bench/convert_memory.py (hidden 4096, 4 MoE layers x 16
experts: 4.7 GB in bf16), then, each in its own processes:
  hf:   torchrun 2 ranks: meta model -> FSDP2 -> each rank reads its slices of the safetensors
  dcp:  `mmtune convert hf-to-dcp` (one process), then torchrun 2 ranks loading the converted DCP
and prints, per rank, the peak RSS (getrusage) and the time from launch until the model is loaded, i.e.
ready for its first step (the step itself costs the same either way), and for dcp the conversion's time
added. The model trains in fp32 on the CPU, so each rank's share of the weights is 4.7 GB (2x the bf16
file / 2 ranks); RSS / share says how much more a rank ever held. Inputs come from the page cache.

    python bench/hf_load.py [--experts 16] [--moe-layers 4] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GB = 1e9
HERE = Path(__file__).resolve().parent


def worker(kind: str, path: str, out: str) -> None:
    """One rank (under torchrun): build the sharded model, load `path`, report time and peak RSS."""
    import resource

    import torch

    sys.path.insert(0, str(HERE.parent))
    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.models.glm4v_moe import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model

    env = init_distributed("cpu", timeout_s=3600)
    hf_dir = path if kind == "hf" else json.loads(Path(out).with_suffix(".job").read_text())["hf"]
    config = Glm4vMoeConfig.from_pretrained(hf_dir)
    freeze = FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False)
    model = build_model(Glm4vMoeForConditionalGeneration, config, env, FSDPOptions(), freeze,
                        hf_path=path if kind == "hf" else None, weights_dcp=path if kind == "dcp" else None)
    loaded = time.time()
    share = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    row = {"rank": env.rank, "loaded_at": loaded, "rss": rss, "share": share,
           "finite": bool(all(torch.isfinite(p.to_local()).all() for p in model.parameters()))}
    with open(f"{out}.{env.rank}", "w") as f:
        json.dump(row, f)
    env.barrier()


def torchrun(kind: str, path: Path, work: Path, hf: Path) -> tuple[float, list[dict]]:
    out = work / f"{kind}_result"
    out.with_suffix(".job").write_text(json.dumps({"hf": str(hf)}))
    subprocess.run(["sync"], check=True)
    t0 = time.time()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--worker", kind, str(path), str(out)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)
    rows = [json.loads(Path(f"{out}.{r}").read_text()) for r in (0, 1)]
    assert all(r["finite"] for r in rows)
    return t0, rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--moe-layers", type=int, default=4)
    p.add_argument("--workdir", default=None)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "PATH", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    work = Path(args.workdir or tempfile.mkdtemp(prefix="hf_load_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    try:
        if not hf.exists():
            gen = [sys.executable, str(HERE / "convert_memory.py"), "--generate-only", str(hf),
                   "--experts", str(args.experts), "--moe-layers", str(args.moe_layers)]
            subprocess.run(gen, check=True, capture_output=True)
        size = sum(f.stat().st_size for f in hf.glob("*.safetensors"))
        print(f"checkpoint: {size / GB:.2f} GB hub layout ({args.moe_layers} MoE layers x {args.experts} experts, "
              "hidden 4096); 2 ranks, fp32 training weights")
        t0, hf_rows = torchrun("hf", hf, work, hf)
        subprocess.run(["sync"], check=True)
        c0 = time.time()
        subprocess.run([sys.executable, "-m", "mmtune", "convert", "hf-to-dcp", "--hf-dir", str(hf), "--save-dir",
                        str(work / "dcp"), "--no-progress", "--force"], check=True, stdout=subprocess.DEVNULL)
        convert_s = time.time() - c0
        d0, dcp_rows = torchrun("dcp", work / "dcp", work, hf)
        print(f"{'path':<28} {'ready to step':>14} {'rank':>5} {'peak RSS GB':>12} {'share GB':>9} {'RSS/share':>10}")
        for name, start, rows, extra in (("--load HF dir", t0, hf_rows, 0.0),
                                         ("convert + --load DCP", d0, dcp_rows, convert_s)):
            for r in rows:
                print(f"{name:<28} {r['loaded_at'] - start + extra:13.1f}s {r['rank']:5d} {r['rss'] / GB:12.2f} "
                      f"{r['share'] / GB:9.2f} {r['rss'] / r['share']:10.2f}")
        hf_t = max(r["loaded_at"] for r in hf_rows) - t0
        dcp_t = max(r["loaded_at"] for r in dcp_rows) - d0
        print(f"time to a loaded model: HF dir {hf_t:.1f} s; convert {convert_s:.1f} s + DCP load {dcp_t:.1f} s = "
              f"{convert_s + dcp_t:.1f} s; ratio {hf_t / (convert_s + dcp_t):.2f}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
