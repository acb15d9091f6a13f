"""A rank that dies and one that hangs while rank 0 waits in a collective with each: rank 0 gets an error
naming the collective within --distributed-timeout-minutes (here 3 s; distributed/errors.py), on groups made
after start-up (env.py gives every group the timeout). Three plain processes, no torchrun: its agent would
kill the survivor before it could speak."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

from dist_utils import free_port

WORKER = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
from mmtune.distributed.env import init_distributed
from mmtune.distributed.errors import collective_failure
env = init_distributed("cpu", timeout_s=3, shard_size=1)  # HSDP: a 2-D mesh
# groups made after start-up (as the async-save group is): rank 0 with the rank that dies / the one that hangs
groups = {"dies": dist.new_group([0, 2], backend="gloo", group_desc="with_dying"),
          "hangs": dist.new_group([0, 1], backend="gloo", group_desc="with_hanging")}
x = torch.ones(4)
if env.rank in (0, 2):
    dist.all_reduce(x, group=groups["dies"])
if env.rank in (0, 1):
    dist.all_reduce(x, group=groups["hangs"])
if env.rank == 2:
    os.kill(os.getpid(), signal.SIGKILL)  # dies instead of joining rank 0's next collective
if env.rank == 1:
    time.sleep(120)  # hangs: never joins it
for name in ("dies", "hangs"):
    t0 = time.monotonic()
    try:
        dist.all_reduce(x, group=groups[name])
        print(f"{name}: no error", flush=True)
    except RuntimeError as e:
        print(f"{name} {time.monotonic() - t0:.2f} s: {collective_failure(e)}", flush=True)
"""


def test_a_dead_and_a_hung_rank_are_named_within_the_timeout():
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    procs = []
    for rank in range(3):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "3", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    lines = {ln.split(" ", 1)[0]: ln for ln in out.splitlines() if re.match(r"^(dies|hangs) ", ln)}
    assert set(lines) == {"dies", "hangs"}, out[-3000:]
    for name, line in lines.items():
        waited = float(line.split(" ")[1])
        # named: op, sequence number on its group, the group; the group's timeout is the flag's, not torch's
        # 30-minute default for groups made after start-up
        desc = {"dies": "with_dying", "hangs": "with_hanging"}[name]
        assert re.search(rf"s: rank 0: collective gloo:all_reduce #2 on process group \d+ \({desc}\)", line), line
        assert "timeout 3 s" in line, line
        if name == "hangs":
            assert "Timed out waiting 3000ms" in line and 2.5 <= waited <= 3 + 30, line
        else:
            assert "Connection" in line and waited <= 30, line


def test_other_errors_are_not_called_collective_failures():
    from mmtune.distributed.errors import collective_failure

    try:
        raise RuntimeError("shape mismatch")
    except RuntimeError as e:
        assert collective_failure(e) is None
    assert collective_failure(ValueError("--lr")) is None
