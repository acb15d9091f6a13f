"""Asynchronous saves and --keep-latest-checkpoints in one process: the caller waits (before changing the
weights) only for the copy into the staging buffer, the pointer moves only once the write is complete, the
next save waits for the previous one, a failed background write is reported, and pruning never touches the
pointer's or an unfinished one."""

from __future__ import annotations

import threading
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mmtune.train.checkpoint import POINTER_FILE, CheckpointSaveError, Checkpointer, prune_checkpoints
from test_checkpoint_resume import _parts


@pytest.fixture
def gated_finish(monkeypatch):
    """FileSystemWriter.finish (the .metadata write that completes a DCP save) waits for the test."""
    gate, entered = threading.Event(), []
    real = dcp.FileSystemWriter.finish

    def finish(self, metadata, results):
        entered.append(str(self.path))
        assert gate.wait(60), "the test never opened the gate"
        return real(self, metadata, results)

    monkeypatch.setattr(dcp.FileSystemWriter, "finish", finish)
    return gate, entered


def _wait_for(cond, timeout=30.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_async_save_publishes_only_when_complete(tmp_path, gated_finish):
    gate, entered = gated_finish
    model, opt, sched = _parts()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(1, model, opt, sched)  # returns once the state is staged
    _wait_for(lambda: entered)
    assert not (tmp_path / POINTER_FILE).exists() and not (tmp_path / "iter_0000001").exists()
    assert (tmp_path / ".iter_0000001.tmp").is_dir()
    ck.wait_staged()  # what the trainer does before its optimizer step
    with torch.no_grad():  # training goes on: the staged copy, not the live weights, is written
        for p in model.parameters():
            p.add_(1.0)
    second = threading.Thread(target=ck.save, args=(2, model, opt, sched))
    second.start()
    time.sleep(0.3)
    assert second.is_alive() and not (tmp_path / ".iter_0000002.tmp").exists()  # waits for save 1
    gate.set()
    second.join(60)
    ck.close()
    assert (tmp_path / POINTER_FILE).read_text() == "2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", POINTER_FILE]
    assert sorted(ck.written_s) == [1, 2] and ck.written_s[1] >= 0.3  # its write was held >= 0.3 s by the gate
    fresh, _, _ = _parts(seed=3)
    Checkpointer.load(tmp_path / "iter_0000001", fresh, load_optim=False)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved[name]), name


def test_failed_background_write_is_reported(tmp_path, monkeypatch):
    def finish(self, metadata, results):
        raise OSError("disk full")

    monkeypatch.setattr(dcp.FileSystemWriter, "finish", finish)
    model, opt, sched = _parts()
    ck = Checkpointer(tmp_path, async_save=True)
    ck.save(1, model, opt, sched)
    with pytest.raises(CheckpointSaveError, match=r"iter_0000001 was not written .*OSError: disk full"):
        ck.wait()
    ck.close()
    assert not (tmp_path / POINTER_FILE).exists() and not (tmp_path / "iter_0000001").exists()


@pytest.mark.parametrize("async_save", [False, True])
def test_keep_latest_checkpoints(tmp_path, async_save):
    model, opt, sched = _parts()
    (tmp_path / ".iter_0000009.tmp").mkdir(parents=True)  # being written by someone: never touched
    ck = Checkpointer(tmp_path, async_save=async_save, keep_latest=2, save_optim=False)
    for step in range(1, 5):
        ck.save(step, model, opt, sched)
    ck.close()
    assert sorted(ck.written_s) == [1, 2, 3, 4]  # the write time of each save (bench/async_save.py reads it)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".iter_0000009.tmp", "iter_0000003", "iter_0000004", POINTER_FILE]
    # the checkpoint the pointer names is kept even when it is not among the newest
    ck = Checkpointer(tmp_path, save_optim=False)
    ck.save(5, model, opt, sched)
    (tmp_path / POINTER_FILE).write_text("3\n")
    assert [p.name for p in prune_checkpoints(tmp_path, 1)] == ["iter_0000004"]
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000005"]
    with pytest.raises(ValueError, match="--keep-latest-checkpoints"):
        Checkpointer(tmp_path, keep_latest=-1)
