"""`mmtune train` end to end in one process on the tiny model and the shapes data (make-tiny -> make-shapes
-> llava-to-mllm -> train): exact resume, checkpoint files, metrics, SIGKILL during a checkpoint write,
frozen modules untouched. The 2-rank run is in test_train_dist.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from mmtune.train.checkpoint import POINTER_FILE, checkpoint_keys
from mmtune.train.cli import main
from test_train_helpers import make_workdir, train_argv

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_hf_dir, shapes_dir):
    """The workdir, with a data cache: the first run (`straight`) builds it, every later start reuses it."""
    work = make_workdir(tmp_path_factory.mktemp("train_cli"), tiny_hf_dir, shapes_dir)
    data = json.loads((work / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["cache_dir"] = str(work / "data_cache")
    (work / "data.json").write_text(json.dumps(data))
    return work


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The in-process runs on one torch thread, as the subprocess and torchrun runs (OMP_NUM_THREADS=1): the
    tiny model's ops gain nothing from two, and on the shared machine two threads thrash."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _argv(work, save, iters, *extra):
    return train_argv(work, save, iters, *extra)


def _metrics(save):
    return [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(work):
    """4 steps, checkpoints at 2 and 4, weights from model.json's init_from_hf_path (the hub-layout tiny dir,
    read slice by slice)."""
    assert main(_argv(work, work / "straight", 4, "--save-interval", "2")) == 0
    return work / "straight"


def test_resume_is_exact_and_checkpoints_are_complete(work, tiny_hf_dir, straight, capsys):
    resumed = work / "resumed"
    assert main(_argv(work, resumed, 4, "--exit-interval", "2")) == 0
    assert (resumed / POINTER_FILE).read_text().strip() == "2"
    capsys.readouterr()
    assert main(_argv(work, resumed, 4, "--load", str(tiny_hf_dir))) == 0  # --save has a checkpoint: resumes
    out = capsys.readouterr().out
    assert f"auto-resume from {resumed / 'iter_0000002'}" in out
    # the data cache `straight` built is reused (and said so), and gives the same losses as the fresh build
    assert f"mmtune train: data cache: reused {work / 'data_cache'}" in out, out
    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in a] == list(range(1, 5)) and [r["step"] for r in b] == list(range(1, 5))
    assert [r["loss"] for r in a] == [r["loss"] for r in b]  # bit-identical in fp32
    assert [r["lr"] for r in a] == [r["lr"] for r in b]
    for r in a:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(r) and r["tokens_per_s"] > 0
    assert a[-1]["loss"] < a[0]["loss"]
    # layout: iter dirs, pointer last, resolved config, tensorboard events
    assert sorted(p.name for p in straight.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    assert (straight / POINTER_FILE).read_text().strip() == "4"
    assert (straight / "train_config.yaml").is_file() and list((straight / "tensorboard").glob("events.*"))
    keys = checkpoint_keys(straight / "iter_0000004")
    assert "model.lm_head.weight" in keys and "train_state" in keys and "rank_state.0" in keys
    assert any(k.startswith("optim.state.model.language_model") for k in keys)
    assert not any(k.startswith("optim.state.model.visual.blocks") for k in keys)  # frozen: no optimizer state
    # frozen vision encoder bit-identical to the HF weights; the decoder moved
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration

    hf = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).state_dict()
    names = ["model.visual.blocks.0.attn.qkv.weight", "model.visual.patch_embed.proj.weight",
             "model.language_model.layers.1.self_attn.q_proj.weight", "lm_head.weight"]
    sd = {f"model.{n}": torch.empty_like(hf[n]) for n in names if n in hf}
    dcp.load(sd, checkpoint_id=str(straight / "iter_0000004"), no_dist=True)
    assert len(sd) == 4, sorted(hf)[:20]
    assert torch.equal(sd["model." + names[0]], hf[names[0]]) and torch.equal(sd["model." + names[1]], hf[names[1]])
    assert not torch.equal(sd["model." + names[2]], hf[names[2]]) and not torch.equal(sd["model." + names[3]], hf[names[3]])


def test_resume_with_other_loader_workers_continues_the_data_exactly(work, straight, capsys):
    """The loader's saved state counts its workers' batches: resumed with another worker count (another node
    type, say) it cannot be used, and the data continues after the rows the saved run consumed instead."""
    resumed = work / "resumed_workers"
    assert main(_argv(work, resumed, 4, "--exit-interval", "2")) == 0  # --num-workers 0
    capsys.readouterr()
    assert main(_argv(work, resumed, 4, "--num-workers", "1")) == 0
    out = capsys.readouterr().out
    assert "(saved with num_workers 0: the data restarts after the 8 rows consumed)" in out, out
    # the same rows (tokens, samples and the routers' per-expert counts equal); the losses equal up to the last
    # bits, which the worker path itself moves (its batches sit in one shared buffer: a straight run with
    # --num-workers 1 differs from one with 0 at step 3 by 1.3e-7 relative)
    a, b = _metrics(straight), _metrics(resumed)
    for key in ("step", "tokens", "samples", "moe_expert_tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * x["loss"] for x, y in zip(a, b)), (a, b)


def test_streaming_resume_with_other_loader_workers_continues_the_stream_exactly(work, capsys):
    """The same for a streamed data set: resumed on another layout, the stream restarts where the saved run
    stood (saved with the checkpoint), and the steps after it take the straight run's samples (losses up to
    the worker path's last bits, as above). (Rows here hold one sample each, so that point is the count
    trained and no row is open; packed rows and several ranks: test_data_pipeline.py
    test_stream_resume_point_of_uneven_ranks_skips_no_sample, test_train_dist.py.)"""
    data = json.loads((work / "data.json").read_text())
    data["dataset_param"]["basic_parameters"].update(streaming=True, cache_dir=None)
    stream = work / "stream"
    stream.mkdir()
    (stream / "data.json").write_text(json.dumps(data))
    shutil.copy(work / "model.json", stream / "model.json")
    straight_s, resumed = stream / "straight", stream / "resumed"
    assert main(_argv(stream, straight_s, 6)) == 0
    assert main(_argv(stream, resumed, 6, "--exit-interval", "3")) == 0  # --num-workers 0
    at_save = sum(r["samples"] for r in _metrics(resumed))  # samples trained by the save at step 3
    capsys.readouterr()
    assert main(_argv(stream, resumed, 6, "--num-workers", "1")) == 0
    out = capsys.readouterr().out
    assert (f"(saved with num_workers 0: the data restarts at sample {at_save} of pass 0 of the stream, where the "
            "slowest rank stood, with 0 earlier samples of open rows)") in out, out
    a, b = _metrics(straight_s), _metrics(resumed)
    for key in ("step", "tokens", "samples", "moe_expert_tokens"):  # the same samples, step by step
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert all(abs(x["loss"] - y["loss"]) <= 1e-6 * x["loss"] for x, y in zip(a, b)), (a, b)


def test_resume_takes_the_flags_optimizer_settings(work, straight, capsys):
    """Moments and the schedule's position from the checkpoint, the settings from the flags: a run resumed
    with a lower --lr (what a non-finite loss's message advises) continues on the new rate's schedule."""
    flags = ("--lr", "1e-3", "--weight-decay", "0.05")
    lowered = work / "lowered_lr"
    shutil.copytree(straight / "iter_0000002", lowered / "iter_0000002")
    (lowered / POINTER_FILE).write_text("2")
    capsys.readouterr()
    assert main(_argv(work, lowered, 4, *flags)) == 0
    out = capsys.readouterr().out
    assert "--lr 0.002 -> 0.001, --weight-decay 0.01 -> 0.05 (the schedule continues at its step)" in out, out
    fresh = work / "fresh_lr"
    assert main(_argv(work, fresh, 4, *flags)) == 0
    got = {r["step"]: r["lr"] for r in _metrics(lowered)}
    assert [got[k] for k in (3, 4)] == [r["lr"] for r in _metrics(fresh)][2:]
    assert [got[k] for k in (3, 4)] != [r["lr"] for r in _metrics(straight)][2:]


def test_hf_dir_and_converted_dcp_start_the_same(work, tiny_hf_dir, straight, tmp_path, capsys):
    """--load of the converted DCP, of a merged-layout HF dir and of the hub-layout one (straight): the same
    3 losses, bit for bit."""
    from safetensors.torch import save_file

    from mmtune.convert import hf_to_dcp
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration

    hf_to_dcp(tiny_hf_dir, tmp_path / "dcp", progress=False)
    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", merged)
    sd = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.bfloat16).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, merged / "model.safetensors")
    want = [r["loss"] for r in _metrics(straight)][:3]
    for name, load in (("from_dcp", tmp_path / "dcp"), ("from_merged", merged)):
        assert main(_argv(work, tmp_path / name, 3, "--load", str(load))) == 0
        assert [r["loss"] for r in _metrics(tmp_path / name)] == want, name
    out = capsys.readouterr().out
    assert f"load weights {tmp_path / 'dcp'}" in out and f"load hf {merged}" in out
    # --no-auto-resume: a save dir holding a checkpoint is not resumed; the run starts over from --load
    assert main(_argv(work, tmp_path / "from_dcp", 2, "--load", str(merged), "--no-auto-resume")) == 0
    assert [r["loss"] for r in _metrics(tmp_path / "from_dcp")] == want[:2]
    assert "auto-resume" not in capsys.readouterr().out


def test_streaming_data_resumes_exactly(work, tmp_path):
    data = json.loads((work / "data.json").read_text())
    data["dataset_param"]["basic_parameters"]["streaming"] = True
    (tmp_path / "data.json").write_text(json.dumps(data))
    (tmp_path / "model.json").write_text((work / "model.json").read_text())
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(_argv(tmp_path, straight, 2)) == 0
    assert main(_argv(tmp_path, resumed, 2, "--exit-interval", "1")) == 0
    assert main(_argv(tmp_path, resumed, 2, "--load", str(resumed))) == 0
    assert [r["loss"] for r in _metrics(straight)] == [r["loss"] for r in _metrics(resumed)]


KILLER = r"""
import os, signal, sys
import torch.distributed.checkpoint as dcp
from mmtune.train.cli import main
real_finish = dcp.FileSystemWriter.finish
def finish(self, metadata, results):
    if "iter_0000002" in str(self.path):  # the second checkpoint: its tensors are written, its .metadata not
        os.kill(os.getpid(), signal.SIGKILL)
    return real_finish(self, metadata, results)
dcp.FileSystemWriter.finish = finish
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_sigkill_during_checkpoint_keeps_the_previous_one(work, mode):
    """Killed while iter 2 is being written (synchronously, or by --async-save's background thread)."""
    save = work / f"killed_{mode}"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    extra = ["--async-save"] if mode == "async" else []
    proc = subprocess.run([sys.executable, "-c", KILLER, *_argv(work, save, 3, "--save-interval", "1", *extra)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (save / POINTER_FILE).read_text().strip() == "1"
    assert not (save / "iter_0000002").exists() and list((save / ".iter_0000002.tmp").glob("*.distcp"))
    assert main(_argv(work, save, 2, *extra)) == 0  # resumes from iter 1 (automatically), rewrites iter 2
    assert (save / POINTER_FILE).read_text().strip() == "2" and not (save / ".iter_0000002.tmp").exists()
    assert [r["step"] for r in _metrics(save)] == [1, 2]  # the lost run's step-2 row was dropped


def test_user_errors_are_named(work, capsys):
    assert main(_argv(work, work / "err", 2, "--load", str(work / "missing"))) == 2
    assert "missing" in capsys.readouterr().err
