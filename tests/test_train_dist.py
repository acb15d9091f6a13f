"""2 gloo ranks (one torchrun launch for everything, see test_train_helpers._worker): per_token_loss and its
gradients identical for a global batch of 4 split 4x1, 1x4 and 2 ranks x 2; 2-rank FSDP2 == 1 rank over 3
steps with rank 1's batches text-only (with activation checkpointing + prefetch, and again as HSDP; the
dense glm4v model too); expert parallelism (EP=2) == 1 rank and its dispatch on adversarial routings
(tests/expert_parallel_worker.py); `torchrun -m mmtune train` on 2 ranks with EP=2, then resumed on 1 rank."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dist_utils import free_port, torchrun
from mmtune.train.checkpoint import POINTER_FILE, checkpoint_keys
from mmtune.train.cli import main
from test_train_helpers import make_sample, make_workdir, train_argv, windows_for
from test_train_loop import _close, _one_step, _trainer

HERE = Path(__file__).parent
EP_FLAGS = ("--expert-model-parallel-size", "2", "--moe-router-bias-update-rate", "1e-3")


@pytest.fixture(scope="module")
def dist(tmp_path_factory, tiny_hf_dir, shapes_dir):
    root = tmp_path_factory.mktemp("train_dist")
    work = make_workdir(root, tiny_hf_dir, shapes_dir)
    from mmtune.convert import hf_to_dcp

    hf_to_dcp(tiny_hf_dir, root / "dcp")
    stream = root / "stream"  # the same data read as a packed stream
    stream.mkdir()
    data = json.loads((work / "data.json").read_text())
    data["dataset_param"]["basic_parameters"].update(streaming=True, packing=True, max_samples=None)
    (stream / "data.json").write_text(json.dumps(data))
    shutil.copy(work / "model.json", stream / "model.json")
    # mmtune train on 2 ranks with expert parallelism (EP=2: each rank owns 2 of the 4 experts) and router-bias
    # balancing: 3 steps from the converted weights-only DCP; 6 steps straight from the HF dir (also the
    # uninterrupted run the elastic-restart tests compare with). test_expert_parallel's 2-rank configurations
    # run in this launch too (`ep_runs`, results in ep_out)
    job = {"out": str(root / "result.json"), "hf_dir": str(tiny_hf_dir),
           "cli_argvs": [train_argv(work, root / "two", 3, "--save-interval", "2", "--load", str(root / "dcp"),
                                    *EP_FLAGS),
                         train_argv(work, root / "two_hf", 6, "--load", str(tiny_hf_dir), *EP_FLAGS),
                         train_argv(stream, root / "two_stream", 2, "--load", str(root / "dcp"))],
           "ep_runs": [{"kind": "parity", "ep": 2}, {"kind": "dispatch"}], "ep_out": str(root / "ep.pt")}
    (root / "job.json").write_text(json.dumps(job))
    proc = torchrun([str(HERE / "test_train_helpers.py"), str(root / "job.json")], nproc=2,
                    env={"PYTHONPATH": f"{HERE}:{HERE.parent}"})
    return {"result": json.loads((root / "result.json").read_text()), "work": work, "save": root / "two",
            "stream": stream, "save_stream": root / "two_stream",
            "save_hf": root / "two_hf", "log": proc.stdout + proc.stderr, "hf_dir": tiny_hf_dir,
            "ep": torch.load(root / "ep.pt", weights_only=False)}


def test_per_token_loss_same_for_every_split(dist):
    samples = [make_sample(i) for i in range(4)]
    loss_4x1, g_4x1 = _one_step(samples, 4)
    loss_1x4, g_1x4 = _one_step(samples, 1)
    ref = dist["result"]["per_token_2x2"]
    assert _close(loss_4x1, loss_1x4) and _close(loss_4x1, ref["loss"]), (loss_4x1, loss_1x4, ref["loss"])
    assert set(ref["grads"]) == set(g_4x1)
    for name, g in g_4x1.items():
        torch.testing.assert_close(g_1x4[name], g, rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(torch.tensor(ref["grads"][name]), g, rtol=1e-5, atol=1e-7, msg=name)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in g_4x1.values()))
    assert _close(norm, ref["grad_norm"], rel=1e-5)


def test_two_ranks_equal_one_rank_with_a_text_only_rank(dist):
    steps = [[make_sample(100 + 4 * k + j, with_image=(j < 2)) for j in range(4)] for k in range(3)]
    t = _trainer([windows_for(steps[k], 4)[0] for k in range(3)], train_iters=3, sgd=True)
    for _ in range(3):
        t.losses.append(t.train_step([t._next_batch()]).loss)
    sd = t.model.state_dict()
    for run in ("three_steps", "three_steps_hsdp"):  # FSDP over 2 ranks; HSDP: 2 replicas of 1-rank shards
        ref = dist["result"][run]
        for a, b in zip(t.losses, ref["losses"]):
            assert _close(a, b, rel=1e-5), (run, t.losses, ref["losses"])
        for name, value in ref["params"].items():
            torch.testing.assert_close(sd[name], torch.tensor(value), rtol=1e-4, atol=1e-5, msg=f"{run} {name}")


def test_dense_glm4v_two_ranks_equal_one_rank(dist):
    """The dense model (no experts, four norms per layer) under FSDP2 with activation checkpointing, and
    as HSDP: the 1-rank run's losses and parameters after 3 steps (rank 1's batches text-only)."""
    from mmtune.models.glm4v import Glm4vForConditionalGeneration, tiny_config
    from mmtune.train.freeze import apply_freeze
    from test_train_helpers import ListLoader, adamw
    from test_train_loop import FREEZE

    steps = [[make_sample(100 + 4 * k + j, with_image=(j < 2)) for j in range(4)] for k in range(3)]
    model = Glm4vForConditionalGeneration(tiny_config())
    model.init_weights(seed=0)
    apply_freeze(model, FREEZE)
    opt, sched = adamw(model, sgd=True)
    from mmtune.distributed import init_distributed
    from mmtune.train.trainer import LoopSettings, Trainer

    s = LoopSettings(train_iters=3, grad_accum_steps=1, loss_type="per_token_loss")
    t = Trainer(s, init_distributed("cpu"), model, opt, sched, ListLoader([windows_for(st, 4)[0] for st in steps]))
    for _ in range(3):
        t.losses.append(t.train_step([t._next_batch()]).loss)
    sd = model.state_dict()
    for run in ("dense_fsdp_recompute", "dense_hsdp"):
        ref = dist["result"][run]
        assert all(_close(a, b, rel=1e-5) for a, b in zip(t.losses, ref["losses"])), (run, t.losses, ref["losses"])
        assert "model.language_model.layers.1.post_self_attn_layernorm.weight" in ref["params"]
        for name, value in ref["params"].items():
            torch.testing.assert_close(sd[name], torch.tensor(value), rtol=1e-4, atol=1e-5, msg=f"{run} {name}")


def test_bf16_mixed_precision_keeps_routers_fp32(dist):
    assert dist["result"]["bf16"] == {"router": "torch.float32", "q_proj": "torch.bfloat16",
                                      "router_grad": "torch.float32", "finite": True}


def _rows(save):
    return [json.loads(line) for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def test_mmtune_train_two_ranks_then_resume_on_one(dist):
    save, work = dist["save"], dist["work"]
    assert "mmtune train: done" in dist["log"] and "load weights " in dist["log"]
    assert {"rank_state.0", "rank_state.1"} <= checkpoint_keys(save / "iter_0000002")
    rows = _rows(save)
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["samples"] == 4 for r in rows)
    # a 2-rank EP=2 checkpoint resumed on 1 rank: DCP reshards the model and the optimizer state (automatic
    # resume from --save, which holds iter 3)
    assert main(train_argv(work, save, 4)) == 0
    rows = _rows(save)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and math.isfinite(rows[-1]["loss"])
    assert rows[-1]["loss"] < rows[0]["loss"] + 1.0


def test_two_ranks_from_the_hf_dir_equal_from_the_converted_dcp(dist):
    assert "load hf " + str(dist["hf_dir"]) in dist["log"]
    hf, dcp = _rows(dist["save_hf"]), _rows(dist["save"])
    assert [r["step"] for r in hf] == list(range(1, 7))
    assert [r["loss"] for r in hf[:3]] == [r["loss"] for r in dcp[:3]]  # bit-identical in fp32
    assert dist["result"]["hf_placements"] == {k: True for k in dist["result"]["hf_placements"]}
    assert len(dist["result"]["hf_placements"]) == 7


def _launch_elastic(dist, root: Path, mode: str) -> dict:
    """`torchrun --max-restarts 1 -m mmtune train` whose rank 1 stalls after step 3 on the first attempt
    (tests/elastic_hook); returns what the test needs to kill it and check the result."""
    run = {"save": root / f"elastic_{mode}", "stalled": root / f"stalled_{mode}.pid", "log": root / f"{mode}.log"}
    extra = ["--async-save"] if mode == "async" else []
    argv = train_argv(dist["work"], run["save"], 6, "--save-interval", "2", "--load", str(dist["hf_dir"]), *EP_FLAGS,
                      *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2", "--max-restarts",
           "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "mmtune", "train", *argv]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": f"{HERE / 'elastic_hook'}:{HERE.parent}", "MMTUNE_TEST_STALL_RANK": "1",
           "MMTUNE_TEST_STALL_AFTER": "3", "MMTUNE_TEST_STALL_FILE": str(run["stalled"])}
    with open(run["log"], "w") as out:
        run["proc"] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return run


def test_elastic_restarts_resume_exactly(dist, tmp_path):
    """torchrun --max-restarts 1, with synchronous and with asynchronous saves (both jobs at once): rank 1 is
    SIGKILLed from outside after step 3; torchrun restarts both workers, which resume from iter 2 by
    themselves and finish. Every loss equals the uninterrupted 2-rank run's; metrics.jsonl has each step once."""
    runs = [_launch_elastic(dist, tmp_path, mode) for mode in ("sync", "async")]
    try:
        deadline = time.monotonic() + 400
        waiting = list(runs)
        while waiting:  # kill each job's rank 1 once it has stalled and iter 2 is complete (async: published)
            for run in list(waiting):
                pointer = run["save"] / POINTER_FILE
                if run["stalled"].is_file() and pointer.is_file() and pointer.read_text().strip() == "2":
                    os.kill(int(run["stalled"].read_text()), signal.SIGKILL)
                    waiting.remove(run)
                else:
                    assert run["proc"].poll() is None and time.monotonic() < deadline, run["log"].read_text()[-5000:]
            time.sleep(0.05)
        codes = [run["proc"].wait(timeout=400) for run in runs]
    finally:
        for run in runs:
            if run["proc"].poll() is None:
                os.killpg(run["proc"].pid, signal.SIGKILL)
    ref = [r["loss"] for r in _rows(dist["save_hf"])]
    for run, rc in zip(runs, codes):
        text = run["log"].read_text()
        assert rc == 0, text[-6000:]
        assert text.count(f"auto-resume from {run['save'] / 'iter_0000002'}") == 1, text[-6000:]  # said once
        rows = _rows(run["save"])
        assert [r["step"] for r in rows] == list(range(1, 7)), run["save"]
        assert [r["loss"] for r in rows] == ref, run["save"]  # bit for bit, before and after the restart
        assert (run["save"] / POINTER_FILE).read_text().strip() == "6"


def test_packed_stream_resumes_on_one_rank_where_the_ranks_stood(dist, capsys):
    """2 ranks on a packed stream save with each checkpoint where a resume on another layout starts: the
    `resume_point` of both ranks' streams (each read back here from that rank's saved loader state; the
    all-gather behind it is what this checks), and resumed on one rank the run starts there
    (test_data_pipeline.py checks that such a point skips no sample)."""
    from mmtune.data.loader import build_train_loader, resume_point
    from mmtune.train.checkpoint import _from_bytes, _load_bytes, peek_train_state

    ckpt = dist["save_stream"] / "iter_0000002"
    saved = peek_train_state(ckpt)["extra"]["stream_position"]
    progress = []
    for rank in range(2):
        loader = build_train_loader(dist["stream"] / "data.json", seq_length=96, micro_batch_size=2, dp_rank=rank,
                                    dp_size=2, num_workers=0, progress=False)
        progress += loader.dataset.progress(_from_bytes(_load_bytes(ckpt, f"rank_state.{rank}"))["dataloader"])
    assert saved == resume_point(progress) and saved["open"], (saved, progress)
    capsys.readouterr()
    assert main(train_argv(dist["stream"], dist["save_stream"], 3)) == 0
    out = capsys.readouterr().out
    assert (f"the data restarts at sample {saved['k']} of pass {saved['epoch']} of the stream, where the slowest "
            f"rank stood, with {sum(map(len, saved['open']))} earlier samples of open rows") in out, out


def test_sharding_size_must_divide_the_world():
    from mmtune.distributed.parallel_dims import ParallelDims

    with pytest.raises(ValueError, match="sharding_size 3 must divide the world size 4"):
        ParallelDims.from_config(4, 3)


def test_two_ranks_expert_parallel_equal_one_rank(dist):
    """EP=2 on 2 ranks (grad-accum 4, packed rows, rank 1 with one image, activation checkpointing, loss
    types alternating per step) == the 1-rank run: losses, grad norms and gradients of 3 steps."""
    import expert_parallel_worker as W

    W.assert_parity(dist["ep"][0], W.reference())


def test_expert_dispatch_all_remote_empty_expert_uneven_tokens(dist):
    """Rank 0 sends every row to rank 1's experts; rank 1 gives expert 1 nothing; 5 vs 11 tokens: outputs and
    every gradient equal the single-device experts."""
    per_rank = dist["ep"][1]
    assert [r["tokens"] for r in per_rank] == [5, 11]
    assert max(r["max_diff"] for r in per_rank) < 1e-5, per_rank


def test_mmtune_train_expert_parallel_metrics(dist):
    """`mmtune train --expert-model-parallel-size 2`: expert loads per MoE layer in metrics.jsonl (every
    non-pad token of the step counted top-k times), the worst layer's max/mean on the step line and in the
    plot."""
    from mmtune.models.glm4v_moe import tiny_config
    from mmtune.plot import panels

    assert "ep 2 x efsdp 1" in dist["log"] and "moe load max/mean" in dist["log"]
    rows = [json.loads(line) for line in (dist["save"] / "metrics.jsonl").read_text().splitlines()][:2]
    top_k = tiny_config().text.num_experts_per_tok
    for r in rows:
        layers = r["moe_expert_tokens"]
        assert len(layers) == 2 and all(len(layer) == 4 for layer in layers)
        assert all(sum(layer) == r["tokens"] * top_k for layer in layers), (layers, r["tokens"])
        worst = max(max(layer) / (sum(layer) / len(layer)) for layer in layers)
        assert r["moe_load_max_mean"] == pytest.approx(worst)
    assert "moe_load_max_mean" in panels(rows)
