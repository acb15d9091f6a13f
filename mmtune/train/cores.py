"""How many intra-op threads and data-loader workers a training rank uses, from the cores it really has.

torch's defaults fight over the cores: each rank starts one intra-op thread per core of the machine, and
each loader worker is a process of its own. On a 2-core machine `mmtune train` with 2 workers and
torch's 2 threads ran a tiny-model step 1.4x slower than with 1 thread and 1 worker (same losses):
threads that spin-wait for a core the workers hold. So the defaults come from the cores of this rank:

- cores of this rank: the CPUs this process may run on (`os.sched_getaffinity`, which respects taskset,
  cgroup cpusets and launchers that pin ranks), shared by the ranks of this node (`LOCAL_WORLD_SIZE`,
  set by torchrun) unless the affinity already holds fewer CPUs than the machine (the launcher pinned
  each rank to its own cores);
- loader workers: none on a single core (the main process loads between steps), else one per 4 cores,
  at least 1 and at most 4 (images are decoded there; the trainer's `data_wait_s` metric shows whether
  they keep up);
- intra-op threads: torchrun's (or the user's) `OMP_NUM_THREADS` when set, else the rank's cores minus
  its workers, at least 1.

Flags override: `--num-threads` and `--num-workers` (and, for the workers, data.json's
`dataloader_param.num_workers` when it is given explicitly: flag > data.json > this choice).
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def cores_of_rank() -> tuple[int, str]:
    """(cores this rank may use, how that was found)."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        usable = os.cpu_count() or 1
    machine = os.cpu_count() or usable
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    if local > 1 and usable >= machine:
        return max(1, usable // local), f"{usable} cores / {local} ranks on this node"
    pinned = " (pinned)" if local > 1 else ""
    return usable, f"{usable} core{'s' if usable != 1 else ''} in this process's affinity{pinned}"


def auto_workers(cores: int) -> int:
    return 0 if cores <= 1 else min(4, max(1, cores // 4))


@dataclass
class CoreChoice:
    threads: int
    workers: int
    reason: str

    def describe(self) -> str:
        return (f"{self.threads} intra-op thread{'s' if self.threads != 1 else ''}, {self.workers} loader "
                f"worker{'s' if self.workers != 1 else ''} per rank ({self.reason})")


def choose_cores(threads_flag: int | None = None, workers_flag: int | None = None,
                 data_json_workers: int | None = None) -> CoreChoice:
    """Threads and workers for this rank (see the module docstring); flags win, then data.json's workers."""
    cores, found = cores_of_rank()
    why = [found]
    if workers_flag is not None:
        workers = workers_flag
        why.append("workers from --num-workers")
    elif data_json_workers is not None:
        workers = data_json_workers
        why.append("workers from data.json dataloader_param.num_workers")
    else:
        workers = auto_workers(cores)
    if threads_flag:
        threads = threads_flag
        why.append("threads from --num-threads")
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        threads = int(os.environ["OMP_NUM_THREADS"])
        why.append("threads from OMP_NUM_THREADS")
    else:
        threads = max(1, cores - workers)
    return CoreChoice(threads, workers, "; ".join(why))


def apply_threads(choice: CoreChoice) -> None:
    import torch

    torch.set_num_threads(choice.threads)
