"""Expert parallelism (gloo, CPU) against the 1-rank run. One 4-rank torchrun launch
(tests/expert_parallel_worker.py) runs every configuration in turn:

4 ranks: EP=2, EP=4, HSDP (2 replicas x 2) with EP=2, and EP=2 on a 6-expert model (3 experts per rank over 2
efsdp ranks: FSDP's Shard(1) placement) — each 3 (2) SGD steps over packed rows, images on some ranks only
(ranks 1 and 3 text-only), grad-accum 2, activation checkpointing, the loss type alternating per_token_loss /
default (one run covers both); then AdamW with router-bias balancing for 4 steps saving at step 2, resumed
on EP=4 (and, here, on 1 rank).
The 2-rank checks (EP=2 the same way with grad-accum 4, the dispatch alone on adversarial routings, `mmtune
train --expert-model-parallel-size 2`) share test_train_dist.py's 2-rank launch and live there.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import expert_parallel_worker as W
from dist_utils import torchrun
from mmtune.distributed import init_distributed
from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
from mmtune.train.moe_balance import routers
from mmtune.train.trainer import Trainer
from test_train_helpers import ListLoader, adamw

HERE = Path(__file__).parent
BIAS_RATE = 1e-2


def _launch(root: Path, nproc: int, runs: list[dict], **extra):
    job = root / f"job{nproc}.json"
    job.write_text(json.dumps({"out": str(root / f"out{nproc}.pt"), "runs": runs, **extra}))
    proc = torchrun([str(HERE / "expert_parallel_worker.py"), str(job)], nproc=nproc, timeout=400,
                    env={"PYTHONPATH": f"{HERE}:{HERE.parent}"})
    return torch.load(root / f"out{nproc}.pt", weights_only=False), proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    root = tmp_path_factory.mktemp("ep4")
    runs = [{"kind": "parity", "ep": 2}, {"kind": "parity", "ep": 4},
            {"kind": "parity", "ep": 2, "shard_size": 2, "steps": 2},
            {"kind": "parity", "ep": 2, "num_experts": 6, "steps": 2},
            {"kind": "checkpoint", "ep": 2, "first": 0, "last": 4, "save_step": 2, "save_dir": str(root / "ckpt"),
             "bias_rate": BIAS_RATE},
            {"kind": "checkpoint", "ep": 4, "first": 2, "last": 4, "load": str(root / "ckpt" / "iter_0000002"),
             "bias_rate": BIAS_RATE}]
    results, _ = _launch(root, 4, runs, gpu_train_argv=["--dry-run", "--expert-model-parallel-size", "2",
                                                        "--modes", "eager,ep"],
                         gpu_train_out=str(root / "gpu_train"))
    return {"results": results, "ckpt": root / "ckpt" / "iter_0000002",
            "gpu_train": json.loads((root / "gpu_train" / "gpu_train.json").read_text())}


@pytest.mark.parametrize("run, layout", [(0, "4 ranks EP=2"), (1, "4 ranks EP=4"), (2, "4 ranks HSDP 2x2, EP=2")])
def test_four_ranks_equal_one_rank(four, run, layout):
    got = four["results"][run]
    W.assert_parity(got, W.reference(steps=len(got["losses"])))


def test_experts_fsdp_sharded_on_dim1_when_a_rank_has_fewer_experts_than_efsdp_ranks(four):
    got = four["results"][3]
    assert got["placement"] == "(Shard(dim=1), Shard(dim=0))", got["placement"]  # efsdp Shard(1), ep Shard(0)
    W.assert_parity(got, W.reference(num_experts=6, steps=2))


def test_checkpoint_resumes_on_four_ranks_ep4_and_one_rank(four, tiny_hf_dir, tmp_path):
    from mmtune.train.checkpoint import Checkpointer

    uninterrupted, resumed_ep4 = four["results"][4], four["results"][5]
    assert W.rel(resumed_ep4["losses"], uninterrupted["losses"][2:]) <= 1e-5, (resumed_ep4, uninterrupted)
    # one rank, no expert parallelism: the same two steps, and the same router-bias updates
    model = W.one_rank()
    opt, sched = adamw(model, lr=1e-2)
    state = Checkpointer.load(four["ckpt"], model, opt, sched)
    assert state.step == 2
    saved_bias = [g.e_score_correction_bias.clone() for g in routers(model)]
    loaded_sd = {k: v.clone() for k, v in model.state_dict().items()}
    s = W.settings(loss_type="per_token_loss", clip_grad=1.0, router_bias_update_rate=BIAS_RATE)
    t = Trainer(s, init_distributed("cpu"), model, opt, sched, ListLoader(W.rank_batches(range(2, 4), 0, 1)))
    with W.one_thread():
        for _ in range(2):
            t.losses.append(t.train_step([t._next_batch() for _ in range(W.MICRO_BATCHES)]).loss)
    assert W.rel(t.losses, uninterrupted["losses"][2:]) <= 1e-5, (t.losses, uninterrupted["losses"])
    for ours, ep2, ep4, at_save in zip(t.gates, uninterrupted["bias"], resumed_ep4["bias"], saved_bias):
        assert at_save.abs().sum() > 0  # the first two steps moved it, and the checkpoint carried it
        assert torch.equal(ours.e_score_correction_bias, ep2) and torch.equal(ep2, ep4)
        assert not torch.equal(ep2, at_save)
    # the checkpoint holds the logical [E, ...] expert tensors: dcp-to-hf exports them unchanged
    from mmtune.convert import dcp_to_hf

    dcp_to_hf(tiny_hf_dir, four["ckpt"], tmp_path / "hf")
    exported = Glm4vMoeForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    for name, value in exported.state_dict().items():
        assert torch.equal(value, loaded_sd[name]), name


def test_bias_update_moves_toward_balance():
    """A router whose bias sends every token to experts 0 and 1: the update spreads the load."""
    from mmtune.ops.moe import TopKRouter
    from mmtune.train.moe_balance import expert_loads, load_summary, update_router_bias

    torch.manual_seed(0)
    gate = TopKRouter(16, 8, 2)
    torch.nn.init.normal_(gate.weight, std=0.1)
    gate.e_score_correction_bias[:2] = 1.0
    x = torch.randn(256, 16)
    ratios = []
    for _ in range(40):
        logits, _, _ = gate(x)
        loads = expert_loads([gate], [logits], None)
        ratios.append(load_summary(loads)["moe_load_max_mean"])
        update_router_bias([gate], loads, 0.02)
    assert ratios[0] == pytest.approx(4.0)  # E/K: all 256 tokens on the same 2 of 8 experts
    assert ratios[-1] < 1.5 and max(ratios[-10:]) < 2.0, ratios
    assert (gate.e_score_correction_bias[:2] < 1.0).all() and (gate.e_score_correction_bias[2:] > 0).any()




def test_gpu_train_bench_expert_parallel_dry_run(four):
    """bench/gpu_train.py --expert-model-parallel-size 2 --modes eager,ep on the 4 gloo ranks (tiny config):
    FSDP only and EP=2 both train, EP's speed over FSDP only and the routing balance are reported."""
    res = four["gpu_train"]
    assert res["world_size"] == 4 and res["expert_model_parallel_size"] == 2
    eager, ep = res["modes"]["eager"], res["modes"]["ep"]
    assert eager["backend"] == "gloo" and eager["step_s"] > 0 and ep["step_s"] > 0 and ep["expert_parallel_size"] == 2
    assert ep["vs_eager"]["step"] == pytest.approx(eager["step_s"] / ep["step_s"])
    assert ep["tokens_per_s"] == pytest.approx(4 * 64 / ep["fwd_bwd_s"])  # every rank's own row
    # (max over mean of the tokens per expert: 1 = balanced, E/K = 2 = every token on the same K experts)
    assert 1.0 <= ep["moe_load_max_mean"] <= 2.0 and eager["moe_load_max_mean"] == ep["moe_load_max_mean"]
