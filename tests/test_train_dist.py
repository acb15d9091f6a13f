"""2 gloo ranks (one torchrun launch for everything, see test_train_helpers._worker): per_token_loss and its
gradients identical for a global batch of 4 split 4x1, 1x4 and 2 ranks x 2; 2-rank FSDP2 == 1 rank over 3
steps with rank 1's batches text-only (with activation checkpointing + prefetch, and again as HSDP);
expert parallelism (EP=2) == 1 rank and its dispatch on adversarial routings (tests/expert_parallel_worker.py);
`torchrun -m mmtune train` on 2 ranks with EP=2, then resumed on 1 rank."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dist_utils import torchrun
from mmtune.train.checkpoint import checkpoint_keys
from mmtune.train.cli import main
from test_train_helpers import make_sample, make_workdir, train_argv, windows_for
from test_train_loop import _close, _one_step, _trainer

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def dist(tmp_path_factory, tiny_hf_dir, shapes_dir):
    root = tmp_path_factory.mktemp("train_dist")
    work = make_workdir(root, tiny_hf_dir, shapes_dir)
    from mmtune.convert import hf_to_dcp

    hf_to_dcp(tiny_hf_dir, root / "dcp")  # the 2-rank run starts from the converted weights-only DCP
    # the CLI run uses expert parallelism (EP=2: each rank owns 2 of the 4 experts); test_expert_parallel's
    # 2-rank configurations run in this launch too (`ep_runs`, results in ep_out)
    job = {"out": str(root / "result.json"),
           "cli_argv": train_argv(work, root / "two", 2, "--save-interval", "2", "--load", str(root / "dcp"),
                                  "--expert-model-parallel-size", "2", "--moe-router-bias-update-rate", "1e-3"),
           "ep_runs": [{"kind": "parity", "ep": 2}, {"kind": "dispatch"}], "ep_out": str(root / "ep.pt")}
    (root / "job.json").write_text(json.dumps(job))
    proc = torchrun([str(HERE / "test_train_helpers.py"), str(root / "job.json")], nproc=2,
                    env={"PYTHONPATH": f"{HERE}:{HERE.parent}"})
    return {"result": json.loads((root / "result.json").read_text()), "work": work, "save": root / "two",
            "log": proc.stdout + proc.stderr, "ep": torch.load(root / "ep.pt", weights_only=False)}


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


def test_bf16_mixed_precision_keeps_routers_fp32(dist):
    assert dist["result"]["bf16"] == {"router": "torch.float32", "q_proj": "torch.bfloat16",
                                      "router_grad": "torch.float32", "finite": True}


def test_mmtune_train_two_ranks_then_resume_on_one(dist):
    save, work = dist["save"], dist["work"]
    assert "mmtune train: done" in dist["log"] and "load weights " in dist["log"]
    assert {"rank_state.0", "rank_state.1"} <= checkpoint_keys(save / "iter_0000002")
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["samples"] == 4 for r in rows)
    # a 2-rank EP=2 checkpoint resumed on 1 rank: DCP reshards the model and the optimizer state (--load now
    # names the save dir; the last --load wins)
    assert main(train_argv(work, save, 3, "--load", str(save))) == 0
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and math.isfinite(rows[-1]["loss"])
    assert rows[-1]["loss"] < rows[0]["loss"] + 1.0


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
