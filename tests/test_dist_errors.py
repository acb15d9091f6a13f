"""A rank that dies and one that hangs while rank 0 waits in a collective with each: rank 0 gets an error
naming the collective within --distributed-timeout-minutes (here 3 s; distributed/errors.py), on groups made
after start-up (env.py gives every group the timeout). Three plain processes, no torchrun: its agent would
kill the survivor before it could speak. And `mmtune train` turns a failed collective into one line and
exit code 1."""

from __future__ import annotations

import os
import re
import subprocess
import sys
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


def test_mmtune_train_names_a_failed_collective_in_one_line_and_exits_1(tmp_path, tiny_hf_dir, shapes_dir,
                                                                         monkeypatch, capsys):
    """`mmtune train` (train/cli.py main) on a real 1-rank gloo process group, where a collective fails inside
    torch.distributed during the run: ONE line on stderr naming the collective, exit code 1, the process
    group shut down. (A wrongly sized all-gather stands in for a dead peer: on one rank nothing can die.)"""
    import torch
    import torch.distributed as dist

    import mmtune.train.cli as train_cli
    from test_train_helpers import make_workdir, train_argv

    work = make_workdir(tmp_path, tiny_hf_dir, shapes_dir)
    for key, value in {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("TORCH_FR_BUFFER_SIZE", "")  # (so that the value init_distributed sets is undone after)
    monkeypatch.delenv("TORCH_FR_BUFFER_SIZE")  # init_distributed turns the recorder on, as in every run

    def seed_then_fail(seed):  # the run's first step inside its error handling: a collective fails in gloo
        dist.all_gather_single(torch.empty(3), torch.ones(2))

    monkeypatch.setattr(train_cli, "_seed_everything", seed_then_fail)
    assert train_cli.main(train_argv(work, tmp_path / "save", 1)) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err if line.startswith("mmtune train:")]
    assert len(errors) == 1, err
    # (the bad argument fails before the flight recorder records the call: the traceback names it)
    assert re.match(r"mmtune train: error: rank 0: collective all_gather_single \(torch.distributed; not in the "
                    r"flight recorder\) called from mmtune/train/cli.py:\d+ \(run\) failed: ProcessGroupGloo::"
                    r"allgather: invalid tensor size .* another rank died or stopped making progress", errors[0]), errors[0]
    assert not any("Traceback" in line for line in err), err
    assert not dist.is_initialized()


def test_other_errors_are_not_called_collective_failures():
    from mmtune.distributed.errors import collective_failure

    try:
        raise RuntimeError("shape mismatch")
    except RuntimeError as e:
        assert collective_failure(e) is None
    assert collective_failure(ValueError("--lr")) is None
