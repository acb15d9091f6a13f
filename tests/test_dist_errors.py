"""A rank that dies or hangs inside a collective: the other rank exits within --distributed-timeout-minutes
(here 3 s) with an error naming the collective (distributed/errors.py), also on a group made after start-up
(env.py gives every group the timeout). Two plain processes, no torchrun: its agent would kill the
survivor before it could speak."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dist_utils import free_port

WORKER = r"""
import os, signal, sys, time
import torch, torch.distributed as dist
from mmtune.distributed.env import init_distributed
from mmtune.distributed.errors import collective_failure
mode = sys.argv[1]
env = init_distributed("cpu", timeout_s=3, shard_size=1)  # HSDP: a 2-D mesh
group = dist.new_group(backend="gloo", group_desc="made_later")  # as the async-save group is
x = torch.ones(4)
dist.all_reduce(x, group=group)
if env.rank == 1:
    if mode == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)  # hang: never joins the next collective
t0 = time.monotonic()
try:
    dist.all_reduce(x, group=group)
except RuntimeError as e:
    print(f"{time.monotonic() - t0:.2f} s: {collective_failure(e)}", flush=True)
    sys.exit(1)
print("no error", flush=True)
"""


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_is_named_within_the_timeout(mode):
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    procs = []
    for rank in (0, 1):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(repo)}
        env.pop("TORCHELASTIC_USE_AGENT_STORE", None)
        procs.append(subprocess.Popen([sys.executable, "-c", WORKER, mode], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    try:
        start = time.monotonic()
        out, _ = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - start
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 1, out[-3000:]
    line = [ln for ln in out.splitlines() if " s: rank 0: collective " in ln]
    assert line, out[-3000:]
    waited, text = float(line[0].split(" s:")[0]), line[0]
    # the group made after start-up has the flag's timeout, not torch's 30 min default for new groups
    assert re.search(r"collective gloo:all_reduce #2 on process group \d+ \(made_later\)", text), text
    assert "timeout 3 s" in text, text
    if mode == "hang":
        assert "Timed out waiting 3000ms" in text and 2.5 <= waited <= 3 + 30, text
    else:
        assert "Connection" in text and waited <= 30, text
    assert elapsed < 120


def test_other_errors_are_not_called_collective_failures():
    from mmtune.distributed.errors import collective_failure

    try:
        raise RuntimeError("shape mismatch")
    except RuntimeError as e:
        assert collective_failure(e) is None
    assert collective_failure(ValueError("--lr")) is None
