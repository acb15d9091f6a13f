"""The data cache on a shared file system (data/cache.py): one builder, waiters, abandoned locks, failed builds,
overwrite_cache without deleting; `mmtune data preprocess`; and 4 processes as 2 "nodes" x 2 ranks starting
`mmtune train` together on one cache dir."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from mmtune.data import cache as C

HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _fast_poll(monkeypatch):
    monkeypatch.setattr(C, "POLL_S", 0.02)
    monkeypatch.setattr(C, "HEARTBEAT_S", 0.05)


def _builder(calls: list, delay: float = 0.3, fail: Exception | None = None):
    def build(staging: Path, lock: C.BuildLock) -> None:
        calls.append(threading.get_ident())
        lock.update(0, 10, "preprocessing")
        staging.mkdir()
        time.sleep(delay)
        if fail is not None:
            raise fail
        (staging / "rows.txt").write_text("the rows")
        lock.update(10)
    return build


def _together(n: int, fn) -> list:
    """Run fn() in n threads released at once; returns results (or exceptions) in thread order."""
    out: list = [None] * n
    go = threading.Barrier(n)

    def run(i):
        go.wait()
        try:
            out[i] = fn()
        except Exception as e:  # noqa: BLE001 - handed back to the test
            out[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return out


@pytest.mark.parametrize("hard_links", [True, False])
def test_one_builder_the_others_wait_then_read_the_published_cache(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # a file system without them: the lock falls back to O_EXCL creation
        monkeypatch.setattr(C.os, "link", lambda *a: (_ for _ in ()).throw(PermissionError("no hard links")))
    calls: list = []
    results = _together(4, lambda: C.get_or_build(tmp_path, "mmtune-x", _builder(calls), progress=False))
    assert len(calls) == 1 and all(isinstance(r, C.CacheResult) for r in results), results
    assert sum(r.built for r in results) == 1 and {r.path for r in results} == {tmp_path / "mmtune-x"}
    assert all(r.waited_s > 0.1 for r in results if not r.built)
    assert (tmp_path / "mmtune-x" / "rows.txt").read_text() == "the rows"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mmtune-x"]  # no lock, status or staging left
    again = C.get_or_build(tmp_path, "mmtune-x", _builder(calls), progress=False)
    assert not again.built and len(calls) == 1 and again.waited_s == 0


def test_an_abandoned_lock_is_taken_over_and_a_live_one_is_not(tmp_path):
    (tmp_path / "mmtune-x.lock").write_text(json.dumps({"builder": "deadhost:1"}))  # a builder that died
    calls: list = []
    t0 = time.monotonic()
    r = C.get_or_build(tmp_path, "mmtune-x", _builder(calls, delay=0), progress=False, stale_s=0.5)
    assert r.built and len(calls) == 1 and 0.5 <= time.monotonic() - t0 < 10
    # a build slower than stale_s keeps its lock alive with heartbeats: nobody takes over
    calls.clear()
    results = _together(2, lambda: C.get_or_build(tmp_path, "mmtune-y", _builder(calls, delay=1.0), progress=False,
                                                   stale_s=0.3))
    assert len(calls) == 1 and sum(r.built for r in results) == 1, results


def test_a_failed_build_fails_every_waiter_once(tmp_path):
    calls: list = []
    err = ValueError("data.json: bad sample file")
    results = _together(3, lambda: C.get_or_build(tmp_path, "mmtune-x", _builder(calls, fail=err), progress=False))
    assert len(calls) == 1, "the waiters must not rebuild a build that just failed"
    assert all(isinstance(r, ValueError) and "bad sample file" in str(r) for r in results), results
    assert not (tmp_path / "mmtune-x").exists() and not (tmp_path / "mmtune-x.lock").exists()
    assert not list(tmp_path.glob("*.building-*"))


def test_overwrite_rebuilds_once_per_token_and_never_deletes_the_old_cache(tmp_path):
    calls: list = []
    first = C.get_or_build(tmp_path, "mmtune-x", _builder(calls, delay=0), progress=False)
    reader = open(first.path / "rows.txt")  # a process still reading the old cache
    results = _together(3, lambda: C.get_or_build(tmp_path, "mmtune-x", _builder(calls, delay=0.2), token="job1",
                                                   progress=False))
    assert len(calls) == 2 and sum(r.built for r in results) == 1
    assert C.read_build_info(tmp_path / "mmtune-x")["token"] == "job1"
    old = list(tmp_path.glob("mmtune-x.old-*"))
    assert len(old) == 1 and (old[0] / "rows.txt").is_file() and reader.read() == "the rows"
    reader.close()
    assert not C.get_or_build(tmp_path, "mmtune-x", _builder(calls), token="job1", progress=False).built
    assert C.get_or_build(tmp_path, "mmtune-x", _builder(calls, delay=0), token="job2", progress=False).built


def test_waiters_see_the_builders_progress(tmp_path, capsys):
    calls: list = []
    slow = _builder(calls, delay=0.5)
    results = _together(2, lambda: C.get_or_build(tmp_path, "mmtune-x", slow, progress=True))
    assert sum(r.built for r in results) == 1
    assert re.search(r"data cache: waiting for \S+:\d+ to build mmtune-x", capsys.readouterr().err)


def test_two_nodes_of_two_ranks_build_the_cache_once_then_it_is_reused(tmp_path, tiny_hf_dir, shapes_dir):
    """4 processes (2 "nodes" x 2 ranks: LOCAL_RANK 0 twice) start the training data loader at once on one cache
    dir: one process builds, all four read that one published cache and the same row plan, each rank its own
    share; `mmtune data preprocess` then reuses it."""
    from dist_utils import free_port
    from mmtune.data.cli import main as data_main
    from test_train_helpers import make_workdir

    work = make_workdir(tmp_path, tiny_hf_dir, shapes_dir, max_samples=16)
    data = json.loads((work / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["cache_dir"] = str(tmp_path / "shared_cache")
    (work / "data.json").write_text(json.dumps(data))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{HERE}:{HERE.parent}"}
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(n),
                               "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(port),
                               str(Path(__file__)), str(work / "data.json"), str(tmp_path / "out")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for n in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), "\n".join(o[-4000:] for o in outs)
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in range(4)]
    assert [r["local_rank"] for r in ranks] == [0, 1, 0, 1]
    assert sum(r["built"] for r in ranks) == 1, ranks  # one builder of the four (whichever got the lock)
    assert "\n".join(outs).count("data cache: built ") == 1
    cache = Path(ranks[0]["cache"])
    assert cache.parent == tmp_path / "shared_cache" and {r["cache"] for r in ranks} == {str(cache)}
    assert len({r["plan"] for r in ranks}) == 1  # the same rows everywhere
    firsts = [s for r in ranks for s in r["first"]]
    assert len(set(firsts)) == 4  # each rank its own share of them
    assert sorted(p.name for p in cache.parent.iterdir()) == [cache.name]  # nothing half-built left behind
    # a second start: the offline preprocess command (and any later job) reuses it
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert data_main(["preprocess", "--mm-data", str(work / "data.json"), "--seq-length", "96"]) == 0
    text = out.getvalue()
    assert f"data cache: reused {cache} (16 samples" in text and "with --seq-length 96: 16 samples, one a row" in text


def test_training_prepares_data_before_it_builds_the_model(tmp_path, tiny_hf_dir, shapes_dir, monkeypatch, capsys):
    """A data error stops `mmtune train` before any model is built (the order of train/cli.py)."""
    import mmtune.train.model_build as model_build
    from mmtune.train.cli import main
    from test_train_helpers import make_workdir, train_argv

    work = make_workdir(tmp_path, tiny_hf_dir, shapes_dir)
    data = json.loads((work / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["dataset"] = "no_such_file.json"
    (work / "data.json").write_text(json.dumps(data))
    built = []
    monkeypatch.setattr(model_build, "build_model", lambda *a, **k: built.append(1))
    assert main(train_argv(work, tmp_path / "save", 1)) == 2
    assert "no_such_file.json" in capsys.readouterr().err and not built


def _worker(data_json: str, out_dir: str) -> None:
    """One rank of test_two_nodes_of_two_ranks_build_the_cache_once_then_it_is_reused: the training loader (as
    `mmtune train` builds it), then what it read."""
    import hashlib

    import torch.distributed as dist

    from mmtune.data.loader import build_train_loader

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    loader = build_train_loader(data_json, seq_length=96, micro_batch_size=1, dp_rank=rank, dp_size=world, seed=0,
                                num_workers=0, progress=rank == 0)
    batch = next(iter(loader))
    prepared = loader.prepared
    plan = hashlib.sha256(json.dumps([[prepared.ds[i]["src"] for i, _ in row] for row in loader.dataset.rows])
                          .encode()).hexdigest()
    first = [prepared.ds[i]["src"] for i, _ in loader.dataset.rows[next(iter(loader.sampler))]]
    assert batch["num_samples"] == 1
    Path(out_dir).mkdir(exist_ok=True)
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps({
        "local_rank": int(os.environ["LOCAL_RANK"]), "built": not prepared.from_cache, "cache": str(prepared.cache_path),
        "plan": plan, "first": first}))
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(*sys.argv[1:3])
