"""Peak memory and time of the lm-head + cross-entropy forward+backward: chunked vs plain (unchunked).

Each mode runs in its own subprocess on the CPU; memory is the process's peak RSS (VmHWM, reset just
before the loss) minus its RSS once the inputs exist, i.e. what the loss itself adds: logits, their
gradients, and the lm-head weight gradient (the same [V x H] in both modes). Prints one line per mode
and the ratio chunked / plain, measured side by side in the same run.

    python bench/chunked_loss_memory.py                       # vocab 151552 x 8192 tokens, hidden 4096
    python bench/chunked_loss_memory.py --hidden 1024         # when 24 GiB is too little for the plain run
    python bench/chunked_loss_memory.py --hidden 1024 --dtype bfloat16   # the GPU training dtype
    python bench/chunked_loss_memory.py --dtype bfloat16 --modes chunk   # only the chunked run

bf16 (hidden states and lm-head weight in bf16, as FSDP2's param_dtype gives them on a GPU): the chunked
path keeps an fp32 [chunk x V] buffer, its bf16 copy, the fp32 [V x H] weight-gradient accumulator and at
the end its bf16 cast; the plain path holds [N x V] bf16 logits, their fp32 copy, log-softmax and its
gradient. Targets (chunked / plain): <= 0.25 in fp32, <= 0.15 in bf16.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _mem_available_gib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    return float("inf")


def child(args) -> None:
    import torch

    from mmtune.train.loss import LossContext, lm_loss

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    hidden = (torch.randn(1, args.tokens, args.hidden) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, args.vocab, (1, args.tokens))
    ctx = LossContext("default")
    kw = dict(compute_mode=args.child, chunk_size=args.chunk)

    def step():
        out = lm_loss(hidden, weight, labels, ctx, **kw)
        out.loss_for_backward.backward()
        return float(out.loss_value)

    base_kib = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM (peak RSS) to the current RSS
        f.write("5")
    t0 = time.perf_counter()
    loss = step()
    first_s = time.perf_counter() - t0
    peak_kib = _status_kib("VmHWM")
    hidden.grad = weight.grad = None
    t0 = time.perf_counter()
    step()
    second_s = time.perf_counter() - t0
    print(json.dumps({"mode": args.child, "loss": loss, "base_gib": base_kib / 2**20, "peak_gib": peak_kib / 2**20,
                      "loss_gib": (peak_kib - base_kib) / 2**20, "time_s": min(first_s, second_s)}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=151552, help="vocab size (GLM-4.5V: 151552)")
    p.add_argument("--tokens", type=int, default=8192, help="labelled tokens in the micro-batch")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (GLM-4.5V: 4096)")
    p.add_argument("--chunk", type=int, default=1024, help="chunk size in tokens (loss_cfg.chunk_size)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="hidden/weight dtype")
    p.add_argument("--threads", type=int, default=0, help="torch threads in the children (0: torch's default)")
    p.add_argument("--modes", default="chunk,default", help="comma-separated: chunk (chunked), default (plain)")
    p.add_argument("--child", choices=["chunk", "default"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return 0

    modes = [m for m in args.modes.split(",") if m]
    if not modes or set(modes) - {"chunk", "default"}:
        p.error(f"--modes {args.modes!r}: use chunk, default or both")
    itemsize = 4 if args.dtype == "float32" else 2
    need_gib = (args.tokens * args.vocab * (12 + (2 if itemsize == 2 else 0))
                + args.vocab * args.hidden * (4 + 2 * itemsize)) / 2**30
    if "default" in modes and need_gib > 0.9 * _mem_available_gib():
        print(f"the plain run needs about {need_gib:.1f} GiB, only {_mem_available_gib():.1f} GiB available: "
              "lower --hidden or --tokens", file=sys.stderr)
        return 1
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    results = {}
    for mode in modes:
        cmd = [sys.executable, __file__, "--child", mode] + [f"--{k}={getattr(args, k)}" for k in
                                                              ("vocab", "tokens", "hidden", "chunk", "dtype")]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"lm-head + CE fwd+bwd: vocab {args.vocab} x {args.tokens} tokens, hidden {args.hidden}, {args.dtype}, CPU")
    for mode, name in (("chunk", f"chunked ({args.chunk})"), ("default", "plain")):
        if mode not in results:
            continue
        r = results[mode]
        print(f"  {name:<15} loss {r['loss']:.6f}  added peak RSS {r['loss_gib']:6.2f} GiB "
              f"(process peak {r['peak_gib']:.2f} GiB)  time {r['time_s']:.2f} s")
    if len(results) == 2:
        c, d = results["chunk"], results["default"]
        target = 0.25 if args.dtype == "float32" else 0.15
        print(f"ratio chunked/plain: memory {c['loss_gib'] / d['loss_gib']:.3f} (target <= {target}), "
              f"time {c['time_s'] / d['time_s']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
