"""The parts of bench/gpu_train.py that are not training modes: the chunked loss's memory alone, and the
time a checkpoint save blocks training (sync vs --async-save). Each writes its figures into a dict that
becomes a section of gpu_train.json."""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from pathlib import Path

import torch


def run_loss_memory(device, r: dict) -> None:
    """Peak memory added by lm_loss forward+backward, chunked vs plain, bf16 hidden states and head weight:
    GLM-4.5V's vocab 151552 x 8192 tokens x hidden 4096 on CUDA (a tiny size on the CPU, where only the
    values are checked). The chunked loss accumulates the head's weight gradient in fp32 in place
    (`loss_chunked_fp32_out_addmm`: with CUDA's fp32-output addmm, no fp32 copy of each chunk)."""
    from mmtune.train.loss import LossContext, _fp32_out_addmm, lm_loss

    vocab, tokens, hidden = (151552, 8192, 4096) if device.type == "cuda" else (1000, 256, 64)
    r.update(vocab=vocab, tokens=tokens, hidden=hidden)
    g = torch.Generator(device=device).manual_seed(0)
    h = (torch.randn(1, tokens, hidden, device=device, generator=g) * 0.5).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(vocab, hidden, device=device, generator=g) * 0.02).to(torch.bfloat16).requires_grad_()
    y = torch.randint(0, vocab, (1, tokens), device=device, generator=g)
    for mode in ("chunk", "default"):
        h.grad = w.grad = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        out = lm_loss(h, w, y, LossContext("default"), compute_mode=mode, chunk_size=1024)
        out.loss_for_backward.backward()
        r[f"loss_{mode}_value"] = float(out.loss_value)
        if device.type == "cuda":
            r[f"loss_{mode}_peak_added_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        del out
    if device.type == "cuda":
        r["loss_chunk_over_plain_memory"] = r["loss_chunk_peak_added_gib"] / r["loss_default_peak_added_gib"]
    r["loss_chunked_fp32_out_addmm"] = _fp32_out_addmm(device)
    del h, w, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _state_bytes(model, opt) -> int:
    """Bytes of this rank's shard of the parameters and optimizer state (what a checkpoint writes)."""
    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    n = sum(local(p).numel() * p.element_size() for p in model.parameters())
    for state in opt.state.values():
        n += sum(local(v).numel() * v.element_size() for v in state.values() if isinstance(v, torch.Tensor))
    return n


def time_saves(model, opt, args, r: dict) -> None:
    """Blocked time of one synchronous and one asynchronous checkpoint save (train/checkpoint.py) of the
    same model + AdamW state into args.save_dir (None: a temp dir, removed after); on CUDA the async copy
    goes to pinned host memory. Skipped (and said so in `r`) when the disk has too little room."""
    import torch.distributed as dist

    from mmtune.train.checkpoint import Checkpointer

    nbytes = torch.tensor(float(_state_bytes(model, opt)), dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(nbytes)  # gloo takes CPU tensors; the group's CPU backend on CUDA
    r["state_gb"] = float(nbytes) / 1e9
    root = Path(args.save_dir) if args.save_dir else Path(tempfile.mkdtemp(prefix="gpu_train_save_"))
    root.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(root).free
    if free < 1.2 * float(nbytes):  # one save at a time: each is removed before the next
        r["skipped"] = (f"skipped: one save needs ~{r['state_gb']:.1f} GB, {root} has {free / 1e9:.1f} GB free "
                        "(--save-dir on a larger disk)")
        return
    t_all = time.perf_counter()
    try:
        for mode in ("sync", "async"):
            ck = Checkpointer(root / mode, async_save=mode == "async")
            t0 = time.perf_counter()
            ck.save(1, model, opt)
            r[f"save_{mode}_call_s"] = ck.last_blocked_s
            ck.wait_staged()  # the copy to host; the trainer overlaps it with the next forward/backward
            r[f"save_{mode}_blocked_s"] = time.perf_counter() - t0
            ck.close()
            r[f"save_{mode}_total_s"] = time.perf_counter() - t0
            if not dist.is_initialized() or dist.get_rank() == 0:
                shutil.rmtree(root / mode)
            if dist.is_initialized():
                dist.barrier()
        r["save_async_over_sync_blocked"] = r["save_async_blocked_s"] / r["save_sync_blocked_s"]
    finally:
        r["wall_s"] = time.perf_counter() - t_all
        if not args.save_dir:
            shutil.rmtree(root, ignore_errors=True)
