"""`mmtune train` end to end in one process on the tiny model and the shapes data (make-tiny -> make-shapes
-> llava-to-mllm -> train): exact resume, checkpoint files, metrics, SIGKILL during a checkpoint write,
frozen modules untouched. The 2-rank run is in test_train_dist.py."""

from __future__ import annotations

import json
import os
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
    return make_workdir(tmp_path_factory.mktemp("train_cli"), tiny_hf_dir, shapes_dir)


def _argv(work, save, iters, *extra):
    return train_argv(work, save, iters, *extra)


def _metrics(save):
    return [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def test_resume_is_exact_and_checkpoints_are_complete(work, tiny_hf_dir):
    straight, resumed = work / "straight", work / "resumed"
    assert main(_argv(work, straight, 4, "--save-interval", "2")) == 0
    assert main(_argv(work, resumed, 4, "--exit-interval", "2")) == 0
    assert (resumed / POINTER_FILE).read_text().strip() == "2"
    assert main(_argv(work, resumed, 4, "--load", str(resumed))) == 0
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


def test_sigkill_during_checkpoint_keeps_the_previous_one(work):
    save = work / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, *_argv(work, save, 3, "--save-interval", "1")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (save / POINTER_FILE).read_text().strip() == "1"
    assert not (save / "iter_0000002").exists() and list((save / ".iter_0000002.tmp").glob("*.distcp"))
    assert main(_argv(work, save, 2, "--load", str(save))) == 0  # resumes from iter 1, rewrites iter 2
    assert (save / POINTER_FILE).read_text().strip() == "2" and not (save / ".iter_0000002.tmp").exists()
    assert [r["step"] for r in _metrics(save)] == [1, 2]  # the lost run's step-2 row was dropped


def test_user_errors_are_named(work, capsys):
    assert main(_argv(work, work / "err", 2, "--load", str(work / "missing"))) == 2
    assert "missing" in capsys.readouterr().err
