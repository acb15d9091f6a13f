"""Ulysses context parallelism (distributed/context_parallel.py).

Exactness (tests/context_parallel_job.py, one 2-rank and one 4-rank torchrun launch): cp 2, cp 4 (more cp
ranks than the tiny model's 2 KV heads), dp 2 x cp 2 with expert parallelism (EP=2 over each cp pair) and
HSDP 2 replicas x cp 2 with activation recompute
train 3 steps whose losses and every parameter's gradient equal the 1-rank run (rel <= 1e-5), for
per_token_loss (chunked CE, frozen tower and projector) and per_sample_loss (everything trains), aux loss
on, on packed rows of an odd length (padded) whose samples straddle the split, with images of several
sizes, a video, a text-only row and a micro-batch without images; at cp 2 also the dense glm4v model. Then `mmtune train --context-parallel-size 2`
saves a checkpoint that one rank resumes: its next loss equals the uninterrupted cp-2 run's, and
bench/gpu_train.py's CP dry run runs. In one process: all five loss types cut over cp shares add up to the
1-rank loss and gradient; padding, the image split and the KV-head repetition.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import pytest
import torch

from context_parallel_job import CASES, reference
from dist_utils import torchrun
from mmtune.distributed.context_parallel import ContextParallel, UlyssesAttention, _pad_cu_seqlens, image_owners
from mmtune.models.glm4v_moe import tiny_config

HERE = Path(__file__).parent
TOL = 1e-5


# ---- one process -----------------------------------------------------------------------------------


def test_pad_batch_adds_a_pad_segment_per_row():
    # rows of 5 tokens (two segments each) padded to 8 for cp 4: every row's padding is a new segment
    assert _pad_cu_seqlens(torch.tensor([0, 3, 5, 8, 10], dtype=torch.int32), 2, 5, 8).tolist() == [0, 3, 5, 8, 11, 13, 16]
    cp = ContextParallel(group=None, size=4, rank=1)
    ids = torch.arange(10).view(2, 5)
    batch = {"input_ids": ids, "labels": ids + 1, "position_ids": torch.arange(5).expand(3, 2, 5),
             "cu_seqlens": torch.tensor([0, 3, 5, 8, 10], dtype=torch.int32), "num_samples": 4}
    out, mask = cp.pad_batch(batch, None, pad_id=99)
    assert out["input_ids"].tolist() == [[0, 1, 2, 3, 4, 99, 99, 99], [5, 6, 7, 8, 9, 99, 99, 99]]
    assert out["labels"][:, 5:].eq(-100).all() and out["labels"][:, :5].equal(batch["labels"])
    assert out["position_ids"][0, 1].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert mask.tolist() == [[True] * 5 + [False] * 3] * 2 and out["num_samples"] == 4
    assert cp.local(out["input_ids"], 1).tolist() == [[2, 3], [7, 8]]  # rank 1's quarter of each row
    four = {**batch, "input_ids": ids[:, :4]}  # 4 tokens a row: nothing to pad
    same, same_mask = cp.pad_batch(four, None, 0)
    assert same is four and same_mask.all()
    with pytest.raises(ValueError, match="not a multiple of --context-parallel-size 4"):
        cp.local(ids, 1)


def test_images_are_split_contiguously_by_patches():
    assert image_owners([16, 16, 16, 16], 2) == [0, 0, 1, 1]
    assert image_owners([64, 16, 16, 16, 16], 2) == [0, 1, 1, 1, 1]  # one large image is a rank's share
    assert image_owners([16], 4) == [2]  # fewer images than ranks: the others encode a dummy
    assert image_owners([4, 4, 4, 4, 4, 4, 4, 4], 4) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_kv_heads_repeated_until_cp_divides_them():
    cp = lambda n: ContextParallel(group=None, size=n, rank=0)  # noqa: E731
    assert UlyssesAttention(cp(4), 96, 8, None).kv_repeat == 1  # GLM-4.5V: 8 KV heads, 2 per rank
    assert UlyssesAttention(cp(16), 96, 8, None).kv_repeat == 2  # one (repeated) KV head per rank
    assert UlyssesAttention(cp(3), 6, 2, None).kv_repeat == 3  # neither divides: as many as query heads
    with pytest.raises(ValueError, match="--context-parallel-size 3 must divide num_attention_heads 4"):
        UlyssesAttention(cp(3), 4, 2, None)


@pytest.mark.parametrize("loss_type", ["default", "per_sample_loss", "per_token_loss", "token_loss", "square_loss"])
def test_every_loss_type_sums_over_the_cp_ranks_to_the_whole_sequence(loss_type):
    """lm_loss on each cp rank's share of the hidden states (weights from the whole micro-batch): the shares'
    contributions add up to the 1-rank loss and, scaled as FSDP averages them, to its gradient."""
    from mmtune.train.loss import LossContext, lm_loss

    g = torch.Generator().manual_seed(0)
    B, S, H, V = 2, 24, 16, 40
    labels = torch.randint(0, V, (B, S), generator=g)
    labels[:, :5] = -100
    labels[1, 12:15] = -100
    cu = torch.tensor([0, 7, 20, 24, 33, 48], dtype=torch.int32)  # samples straddle every split point
    hidden = torch.randn(B, S, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g)
    ctx = LossContext.for_window(loss_type, [(labels, cu)])
    one = lm_loss(hidden, weight, labels, ctx, cu_seqlens=cu)
    (want,) = torch.autograd.grad(one.loss_for_backward, hidden)
    for size in (2, 4):
        total, grad = 0.0, torch.zeros_like(hidden)
        for rank in range(size):
            cp = ContextParallel(group=None, size=size, rank=rank)
            share = cp.local(hidden, 1)
            lo = lm_loss(share, weight, labels, ctx, cu_seqlens=cu, cp=cp, compute_mode="chunk", chunk_size=5)
            total += float(lo.loss_value)
            (g_share,) = torch.autograd.grad(lo.loss_for_backward, hidden)
            grad += g_share / size  # FSDP averages over the dp x cp ranks
        assert abs(total - float(one.loss_value)) <= 1e-6 * abs(float(one.loss_value)), (size, total)
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7)


# ---- torchrun ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_thread():
    """The tiny model's ops are too small for two threads: one is several times faster (the ranks run
    with OMP_NUM_THREADS=1 too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launches(tmp_path_factory, tiny_hf_dir, shapes_dir):
    """The 1-rank reference, then the 2-rank and the 4-rank launch (see the module docstring)."""
    from test_train_helpers import make_workdir, train_argv

    root = tmp_path_factory.mktemp("cp")
    t0 = time.perf_counter()
    with _one_thread():
        torch.save({c.name: reference(c) for c in CASES}, root / "reference.pt")
    print(f"1-rank reference: {time.perf_counter() - t0:.1f} s")
    work = make_workdir(root, tiny_hf_dir, shapes_dir)
    both = [c.name for c in CASES if c.arch == "glm4v_moe"]
    jobs = {
        2: [{"name": "cp2", "cp": 2, "cases": both + ["dense_per_token"]}],
        4: [{"name": "cp4", "cp": 4, "cases": both},
            # with expert parallelism: each cp pair also splits the experts (EP=2, efsdp 2)
            {"name": "dp2xcp2_ep2", "cp": 2, "ep": 2, "cases": ["per_token_frozen_tower"]},
            {"name": "hsdp2xcp2_recompute", "cp": 2, "sharding_size": 2, "recompute": True,
             "cases": ["per_sample_trainable_tower"]}],
    }
    results = {}
    for nproc, layouts in jobs.items():
        job = {"reference": str(root / "reference.pt"), "out": str(root / f"out{nproc}.json"), "layouts": layouts}
        env = {"PYTHONPATH": f"{HERE}:{HERE.parent}"}
        if nproc == 2:  # the CLI at cp 2 (3 steps, a checkpoint after step 2); bench/gpu_train.py's dry run
            job["cli_argv"] = train_argv(work, root / "cp2", 3, "--context-parallel-size", "2",
                                         "--save-interval", "2")
            job["gpu_bench_argv"] = ["--dry-run", "--context-parallel-size", "2", "--modes", "eager,compiled"]
            env["OUT"] = str(root / "gpu_bench")
        (root / f"job{nproc}.json").write_text(json.dumps(job))
        t0 = time.perf_counter()
        torchrun([str(HERE / "context_parallel_job.py"), str(root / f"job{nproc}.json")], nproc=nproc,
                 timeout=600, env=env)
        out = json.loads((root / f"out{nproc}.json").read_text())
        print(f"{nproc}-rank launch: {time.perf_counter() - t0:.1f} s; per run {out.pop('seconds')}")
        results.update(out)
    return {"results": results, "work": work, "save": root / "cp2", "root": root}


@pytest.mark.parametrize("run", ["cp2", "cp4", "dp2xcp2_ep2", "hsdp2xcp2_recompute"])
def test_losses_and_gradients_equal_one_rank(launches, run):
    got = {k: v for k, v in launches["results"].items() if k.startswith(run + "/")}
    assert got, f"no result for {run}"
    assert tiny_config().text.num_key_value_heads < 4  # so cp 4 exceeds the KV heads
    for name, steps in got.items():
        assert len(steps) == 3
        for k, s in enumerate(steps):
            assert s["loss_rel"] <= TOL and s["grad_rel"] <= TOL, (name, k, s)


def test_checkpoint_at_cp2_resumes_at_cp1(launches):
    from mmtune.train.cli import main
    from test_train_helpers import train_argv

    save = launches["save"]
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["samples"] == 4 for r in rows)
    resumed = launches["root"] / "resumed"
    with _one_thread():
        assert main(train_argv(launches["work"], resumed, 3, "--load", str(save / "iter_0000002"))) == 0
    last = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in last] == [3]
    assert abs(last[0]["loss"] - rows[2]["loss"]) <= TOL * abs(rows[2]["loss"]), (last, rows)


def test_gpu_bench_dry_run_with_context_parallel(launches):
    """bench/gpu_train.py --dry-run --context-parallel-size 2 on 2 gloo ranks: the CP training path of the
    GPU bench runs, eager and compiled (the Ulysses seam eager inside the compiled layers), and the first
    loss equals transformers' on the same weights and row (one device)."""
    res = json.loads((launches["root"] / "gpu_bench" / "gpu_train.json").read_text())
    hf = res["hf"][res["modes"]["eager"]["seq_key"]]
    assert res["context_parallel_size"] == 2
    for name in ("eager", "compiled"):
        mode = res["modes"][name]
        assert "error" not in mode, mode
        assert mode["backend"] == "gloo" and mode["step_s"] > 0
        assert abs(mode["first_loss"] - hf["first_loss"]) < 1e-4 * hf["first_loss"], (name, mode, hf)
