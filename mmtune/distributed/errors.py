"""Name the collective behind a distributed failure, so a hang or a dead rank says where it happened.

A rank that dies makes its peers' next collective fail (gloo: "Connection reset by peer"); a rank that
stops making progress makes it time out after --distributed-timeout-minutes (env.py applies it to every
process group). Neither message says WHICH collective. torch's flight recorder does: with
TORCH_FR_BUFFER_SIZE > 0 (env.py turns it on by default) every process group — gloo and NCCL — records
each collective it issues (op, process group, sequence number, sizes, timeout). `collective_failure`
reads the last one this thread issued and the call site from the traceback and makes one line of it.

On NCCL the watchdog may tear the process down before Python sees an exception
(TORCH_NCCL_ASYNC_ERROR_HANDLING=3); the flight recorder then dumps every rank's record to
TORCH_FR_DUMP_TEMP_FILE<rank> on the timeout (examples/glm4.5v/env.sh).
"""

from __future__ import annotations

import os
import pickle
import re
import threading
import traceback

import torch
import torch.distributed as dist

_TORCH_DIST = os.sep.join(("torch", "distributed", ""))
_MMTUNE = os.sep.join(("mmtune", ""))


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names it (`collective_failure`)."""


def last_collective() -> dict | None:
    """The flight recorder's newest entry issued by this thread (or by any, if none), or None when the
    recorder is off or empty."""
    try:
        raw = torch._C._distributed_c10d._dump_fr_trace(includeCollectives=True, includeStackTraces=False)
        entries = pickle.loads(raw).get("entries") or []
    except Exception:  # no recorder in this build / not initialised
        return None
    mine = [e for e in entries if str(e.get("thread_id")) == str(threading.get_ident())]
    return (mine or entries or [None])[-1]


def collective_failure(exc: BaseException) -> str | None:
    """One line naming the failed collective when `exc` was raised from torch.distributed; else None."""
    if not isinstance(exc, RuntimeError) or isinstance(exc, CollectiveError):
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    in_torch = [f for f in frames if _TORCH_DIST in f.filename]
    if not in_torch:
        return None
    ours = [f for f in frames if _MMTUNE in f.filename and _TORCH_DIST not in f.filename]
    site = ""
    if ours:
        f = ours[-1]
        site = f" called from {f.filename[f.filename.rfind(_MMTUNE):]}:{f.lineno} ({f.name})"
    entry = last_collective()
    if entry is not None:
        pg_id, pg_desc = (list(entry.get("process_group") or ("?", "?")) + ["?"])[:2]
        what = (f"{entry.get('profiling_name', '?')} #{entry.get('collective_seq_id', '?')} on process group "
                f"{pg_id} ({pg_desc}), input sizes {entry.get('input_sizes')}, timeout "
                f"{entry.get('timeout_ms', 0) / 1000:g} s")
    else:  # the recorder is off, or the collective failed before it was recorded (e.g. a bad argument)
        size = os.environ.get("TORCH_FR_BUFFER_SIZE") or os.environ.get("TORCH_NCCL_TRACE_BUFFER_SIZE") or "0"
        why = "flight recorder off: TORCH_FR_BUFFER_SIZE=0" if size == "0" else "not in the flight recorder"
        what = f"{in_torch[-1].name} (torch.distributed; {why})"
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    cause = re.sub(r"^\[[^\]]*\]\s*", "", cause)  # gloo prefixes the C++ source location
    return (f"rank {rank}: collective {what}{site} failed: {cause} — another rank died or stopped making "
            "progress; its log says why")
