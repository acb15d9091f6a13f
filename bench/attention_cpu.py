"""Causal attention forward + backward on the CPU: mmtune's chunked kernel (ops/chunked_attention.py) against
torch's SDPA flash kernel on the same inputs, over a range of shapes; prints the median time of each and
the ratio (docs/PERFORMANCE.md "Attention on the CPU").

    python bench/attention_cpu.py [--threads 1] [--steps 8] [--shapes B,H,G,S,D ...]

Inputs are laid out as the decoder hands them over (transposed views of [B, S, heads, D]); runs are
interleaved so machine noise hits both alike; with one thread each call is timed by process CPU time.
Outputs and gradients are checked against each other (max abs difference printed) before timing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmtune.ops import chunked_attention  # noqa: E402

DEFAULT_SHAPES = [  # B, H, G, S, D: the bench models' decoder (4 x 512, 4 heads over 2), then around it
    (4, 4, 2, 512, 64), (1, 4, 2, 512, 64), (4, 4, 2, 256, 64), (8, 4, 4, 256, 64), (2, 4, 2, 384, 64),
    (2, 8, 2, 1024, 64), (1, 16, 2, 2048, 128), (4, 4, 2, 128, 64),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/attention_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: timed by process CPU time)")
    p.add_argument("--steps", type=int, default=8, help="timed calls per kernel and shape (after one warm-up)")
    p.add_argument("--shapes", nargs="*", default=None, metavar="B,H,G,S,D",
                   help="rows, query heads, key/value heads, positions, head dim (default: a fixed list)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    shapes = [tuple(int(x) for x in s.split(",")) for s in args.shapes] if args.shapes else DEFAULT_SHAPES

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    kernels = {"sdpa-flash": flash, "mmtune-chunked": chunked_attention.chunked_causal_attention}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{'process CPU time' if args.threads == 1 else 'wall clock'}; CHUNK {chunked_attention.CHUNK}, "
          f"used from S >= {chunked_attention.MIN_SEQ}")
    print(f"{'B, H, G, S, D':>22} | {'flash ms':>9} | {'chunked ms':>10} | ratio | max |diff|")
    for B, H, G, S, D in shapes:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(B, S, h, D, generator=g).transpose(1, 2).requires_grad_() for h in (H, G, G))
        grad_out = torch.randn(B, H, S, D, generator=g)
        results = {}
        for name, fn in kernels.items():
            out = fn(q, k, v)
            out.backward(grad_out)
            results[name] = [out.detach()] + [t.grad.clone() for t in (q, k, v)]
            for t in (q, k, v):
                t.grad = None
        diff = max(float((a - b).abs().max()) for a, b in zip(*results.values()))
        times = {name: [] for name in kernels}
        for _ in range(args.steps):
            for name, fn in kernels.items():
                t0 = clock()
                fn(q, k, v).backward(grad_out)
                times[name].append(clock() - t0)
                for t in (q, k, v):
                    t.grad = None
        flash_ms, ours_ms = (1e3 * statistics.median(times[n]) for n in kernels)
        shape = str((B, H, G, S, D))
        print(f"{shape:>22} | {flash_ms:9.2f} | {ours_ms:10.2f} | {flash_ms / ours_ms:4.2f}x | {diff:.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
