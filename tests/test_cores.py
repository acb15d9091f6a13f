"""Intra-op threads and loader workers per rank from the cores it has (mmtune/train/cores.py): torch's
defaults (a thread per core in every rank, 2 workers) oversubscribe small machines."""

from __future__ import annotations

import os

import pytest

from mmtune.train.cores import choose_cores


@pytest.fixture
def machine(monkeypatch):
    """machine(cores in the affinity, cores of the machine, local ranks, OMP_NUM_THREADS or None)."""
    def set_up(affinity: int, total: int, local: int = 1, omp: str | None = None):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
        monkeypatch.setattr(os, "cpu_count", lambda: total)
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(local))
        if omp is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", omp)
    return set_up


@pytest.mark.parametrize("affinity,total,local,threads,workers", [
    (2, 2, 1, 1, 1),     # this machine: 1 thread + 1 worker (the issue measured 1.4x over 2 + 2)
    (1, 1, 1, 1, 0),     # one core: the main process loads between steps
    (32, 32, 1, 28, 4),  # one rank on a big machine: workers capped at 4
    (96, 96, 8, 9, 3),   # 8 ranks sharing 96 cores: 12 each
    (4, 16, 4, 3, 1),    # a launcher pinned each of 4 ranks to 4 cores: the affinity is this rank's already
])
def test_threads_and_workers_from_the_cores(machine, affinity, total, local, threads, workers):
    machine(affinity, total, local)
    choice = choose_cores()
    assert (choice.threads, choice.workers) == (threads, workers), choice
    assert f"{threads} intra-op thread" in choice.describe()


def test_flags_then_data_json_then_the_choice(machine):
    machine(16, 16, 1, omp="2")  # torchrun's OMP_NUM_THREADS sets the threads
    assert (choose_cores().threads, choose_cores().workers) == (2, 4)
    assert choose_cores(data_json_workers=1).workers == 1
    chosen = choose_cores(threads_flag=5, workers_flag=0, data_json_workers=1)
    assert (chosen.threads, chosen.workers) == (5, 0)
    assert "--num-threads" in chosen.reason and "--num-workers" in chosen.reason
