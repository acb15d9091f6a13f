"""Training metrics: one log line per --log-interval, metrics.jsonl, TensorBoard, the end-of-run summary.

Throughput counts the whole job (all data-parallel ranks): tokens are the non-pad input tokens of every
micro-batch of the step, summed over ranks by the trainer. MFU = achieved model FLOP/s per device / the
device's peak dense bf16 FLOP/s, printed only where that peak is known (CUDA GPUs in `PEAK_BF16_FLOPS`).
Model FLOPs per token follow the usual 6·N (N = parameters a token touches, experts counted top-k) plus
the attention score/value matmuls (6 · layers · seq · heads · head_dim for causal attention, fwd+bwd).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

# Peak dense bf16 tensor-core FLOP/s (vendor data sheets), matched as substrings of the device name.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,  # SXM; PCIe parts are lower (756e12) — "H100 PCIe" is matched first below
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "B200": 2250e12,
}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_BF16_FLOPS[key]
    return None


def text_flops_per_token(text, seq_len: int) -> float:
    """fwd+bwd FLOPs per token of the text decoder + lm head (`text` is config.text)."""
    H, nh, nkv = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    hd = getattr(text, "head_dim", None) or H // nh
    attn = H * nh * hd + 2 * H * nkv * hd + nh * hd * H
    dense_mlp = 3 * H * text.intermediate_size
    L = text.num_hidden_layers
    if getattr(text, "n_routed_experts", 0):
        moe_mlp = (H * text.n_routed_experts + 3 * H * text.moe_intermediate_size * text.n_shared_experts
                   + text.num_experts_per_tok * 3 * H * text.moe_intermediate_size)
        n_dense = min(getattr(text, "first_k_dense_replace", 0), L)
    else:  # a dense decoder (GLM-4.1V)
        moe_mlp, n_dense = 0, L
    active = L * attn + n_dense * dense_mlp + (L - n_dense) * moe_mlp + H * text.vocab_size
    causal_attn = 6 * L * seq_len * nh * hd  # per token: QK^T and AV, fwd+bwd, causal (half of 2*2*3)
    return 6 * active + causal_attn


def _fmt_count(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.1f}"


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


@dataclass
class StepStats:
    step: int
    loss: float
    lr: float
    grad_norm: float
    step_time: float  # seconds, wall
    tokens: int  # job-wide tokens of the step
    samples: int  # job-wide samples of the step
    skipped: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    data_wait: float = 0.0  # seconds of step_time spent waiting for the loader (and the copy to the device)
    compiling: bool = False  # torch.compile compiled graphs during this step (its time is mostly compiling)


class MetricsLogger:
    """Log lines on rank 0, metrics.jsonl, TensorBoard; running throughput for the summary."""

    def __init__(self, *, metrics_file: str | Path | None, tensorboard_dir: str | Path | None, train_iters: int,
                 flops_per_token: float | None, device: torch.device, world_size: int, enabled: bool,
                 log_tps: bool = True, print_fn=print):
        self.enabled = enabled
        self.train_iters = train_iters
        self.flops_per_token = flops_per_token
        self.peak = peak_flops(device)
        self.device = device
        self.world_size = world_size
        self.log_tps = log_tps
        self.print = print_fn
        self.metrics_file = Path(metrics_file) if metrics_file and enabled else None
        if self.metrics_file:
            self.metrics_file.parent.mkdir(parents=True, exist_ok=True)
        self.tb = None
        if enabled and tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(tensorboard_dir))
            except ImportError:  # the `tensorboard` extra is not installed
                self.print("tensorboard is not installed: no TensorBoard events are written (metrics.jsonl has every "
                           "logged step; pip install 'mmtune[tensorboard]' for the events)", flush=True)
        self.times: list[float] = []
        self.tokens: list[int] = []
        self.samples: list[int] = []
        self.waits: list[float] = []
        self.compiling: list[bool] = []

    def truncate_after(self, step: int) -> None:
        """On resume: drop metrics rows of steps after the checkpoint (written by a run that died before
        its next checkpoint), so the file holds each step once."""
        if not (self.metrics_file and self.metrics_file.is_file()):
            return
        keep = [line for line in self.metrics_file.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        tmp = self.metrics_file.with_name(self.metrics_file.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.metrics_file)

    def record(self, s: StepStats, *, log: bool) -> dict[str, Any] | None:
        """Account a finished step; write it out when `log` (the --log-interval step)."""
        self.times.append(s.step_time)
        self.tokens.append(s.tokens)
        self.samples.append(s.samples)
        self.waits.append(s.data_wait)
        self.compiling.append(s.compiling)
        if not (log and self.enabled):
            return None
        tps = s.tokens / s.step_time if s.step_time > 0 else 0.0
        row: dict[str, Any] = {
            "step": s.step, "loss": s.loss, "lr": s.lr, "grad_norm": s.grad_norm,
            "tokens_per_s": tps, "samples_per_s": s.samples / s.step_time if s.step_time > 0 else 0.0,
            "step_time_s": s.step_time, "data_wait_s": s.data_wait, "tokens": s.tokens, "samples": s.samples,
            "skipped": s.skipped,
        }
        if s.compiling:
            row["compiling"] = True
        if self.flops_per_token and self.peak:
            row["mfu"] = tps * self.flops_per_token / (self.peak * self.world_size)
        if self.device.type == "cuda":
            row["mem_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            row["mem_gib"] = _rss_gib()
        remaining = self.train_iters - s.step
        recent = self.times[-20:]
        row["eta_s"] = remaining * sum(recent) / len(recent)
        row.update(s.extra)
        self._write(row)
        return row

    def _write(self, row: dict[str, Any]) -> None:
        parts = [f"step {row['step']}/{self.train_iters}", f"loss {row['loss']:.5g}", f"lr {row['lr']:.3e}",
                 f"grad_norm {row['grad_norm']:.4g}"]
        if self.log_tps:
            parts += [f"tokens/s {_fmt_count(row['tokens_per_s'])}", f"samples/s {row['samples_per_s']:.2f}"]
        if "mfu" in row:
            parts.append(f"mfu {100 * row['mfu']:.1f}%")
        if "moe_load_max_mean" in row:  # the worst MoE layer's busiest expert over the mean (train/moe_balance.py)
            parts.append(f"moe load max/mean {row['moe_load_max_mean']:.2f} (moe layer {row['moe_load_worst_layer']})")
        parts += [f"mem {row['mem_gib']:.2f}GiB", f"step_time {row['step_time_s']:.3f}s", f"eta {_fmt_time(row['eta_s'])}"]
        if row.get("skipped"):
            parts.append("SKIPPED (non-finite loss)")
        self.print(" | ".join(parts), flush=True)
        if self.metrics_file:
            clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            with open(self.metrics_file, "a") as f:
                f.write(json.dumps(clean) + "\n")
        if self.tb:
            for key in ("loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s", "mfu", "mem_gib", "moe_load_max_mean"):
                if key in row and isinstance(row[key], (int, float)) and math.isfinite(row[key]):
                    self.tb.add_scalar(f"train/{key}", row[key], row["step"])

    def summary(self, skip_first: int = 1) -> dict[str, float]:
        """Mean step time, samples/s, tokens/s and data-wait fraction over the run (first `skip_first` steps
        and steps that compiled left out as warm-up when there are more steps than that). `compile_s`:
        the time compiling steps took beyond a mean step (torch.compile's cost, reported separately)."""
        n = len(self.times)
        keep = [i for i in range(n) if i >= skip_first and not self.compiling[i]] or list(range(min(skip_first, n), n))
        keep = keep or list(range(n))
        times = [self.times[i] for i in keep]
        toks, samp = [self.tokens[i] for i in keep], [self.samples[i] for i in keep]
        total = sum(times)
        mean = total / len(times) if times else 0.0
        out = {"steps": len(times), "mean_step_time_s": mean,
               "samples_per_s": sum(samp) / total if total > 0 else 0.0,
               "tokens_per_s": sum(toks) / total if total > 0 else 0.0,
               "data_wait_frac": sum(self.waits[i] for i in keep) / total if total > 0 else 0.0}
        compiled = [t for t, c in zip(self.times, self.compiling) if c]
        if compiled:
            out["compile_steps"] = len(compiled)
            out["compile_s"] = max(0.0, sum(compiled) - len(compiled) * mean)
        if self.flops_per_token and self.peak and total > 0:
            out["mfu"] = out["tokens_per_s"] * self.flops_per_token / (self.peak * self.world_size)
        return out

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def _rss_gib() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0


class Timer:
    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.elapsed = time.perf_counter() - self.t0
