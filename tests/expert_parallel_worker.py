"""The torchrun worker of tests/test_expert_parallel.py (one launch runs every configuration in turn):

    torchrun --nproc_per_node 4 tests/expert_parallel_worker.py JOB.json

JOB.json: {"out": path, "runs": [{"kind": ..., ...}, ...]}; rank 0 writes the list of results with torch.save
to "out". Optionally "gpu_train_argv" / "gpu_train_out": bench/gpu_train.py run last on the same ranks.
The 2-rank configurations run inside test_train_helpers' 2-rank launch (`run_all`). Also holds the
data the 1-rank references use (`step_batches`), so both sides see the same micro-batches. No tests here.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import replace

import torch

T0 = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_train_helpers import ListLoader, adamw, make_sample  # noqa: E402

from mmtune.data.collate import Sample, collate  # noqa: E402
from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config  # noqa: E402
from mmtune.models.glm4v_moe.rope import get_rope_index  # noqa: E402
from mmtune.train.freeze import FreezeSpec  # noqa: E402

MICRO_BATCHES = 8  # per step: 4 ranks x grad-accum 2, 2 ranks x grad-accum 4, 1 rank x 8
ROW = 48  # tokens per packed row
IMAGE_MICRO_BATCHES = (0, 1, 4)  # the others are text-only: 4 ranks -> ranks 1 and 3 see no image
FREEZE = FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False)
RECORD = ("layers.1.mlp.experts", "layers.2.mlp.experts", "layers.2.mlp.gate", "layers.0.self_attn.q_proj",
          "layers.2.mlp.shared_experts.down_proj", "lm_head", "merger.proj")


def config(num_experts: int = 4):
    cfg = tiny_config()
    cfg.text.n_routed_experts = num_experts
    return cfg


def _sample(seed: int, with_image: bool) -> Sample:
    s = make_sample(seed, seq=16 + seed % 9, with_image=with_image)
    grid = s["image_grid_thw"]
    c = tiny_config()
    pos, _ = get_rope_index(s["input_ids"], grid, image_token_id=c.image_token_id,
                            video_start_token_id=c.video_start_token_id, video_end_token_id=c.video_end_token_id,
                            spatial_merge_size=c.vision.spatial_merge_size)
    pixels = s["pixel_values"].numpy() if with_image else None
    return Sample(s["input_ids"], s["labels"], pos, pixels, grid.tolist() if with_image else [], f"sample {seed}")


def step_batches(step: int) -> list[dict]:
    """The 8 micro-batches of one optimizer step: each one packed row of two samples (+ a pad run)."""
    out = []
    for m in range(MICRO_BATCHES):
        seed = 1000 * step + 10 * m
        row = [_sample(seed, m in IMAGE_MICRO_BATCHES), _sample(seed + 1, False)]
        out.append(collate([row], pad_id=tiny_config().text.pad_token_id, pad_to=ROW))
    return out


def rank_batches(steps: range, rank: int, world: int) -> list[dict]:
    """This rank's micro-batches, step after step: rank r takes micro-batches [r*G, (r+1)*G) of each step."""
    g = MICRO_BATCHES // world
    return [b for k in steps for b in step_batches(k)[rank * g : (rank + 1) * g]]


def recorded(name: str) -> bool:
    return any(key in name for key in RECORD)


# ------------------------------------------------------------------------------------------- runs


def _env(env, ep: int, shard_size=None):
    from mmtune.distributed.parallel_dims import ParallelDims

    return replace(env, dims=ParallelDims.from_config(env.world_size, shard_size, ep=ep).build_meshes("cpu"))


def _build(env, cfg, activation_checkpointing: bool):
    from mmtune.distributed import FSDPOptions
    from mmtune.train.model_build import build_model

    torch.manual_seed(0)
    opts = FSDPOptions(activation_checkpointing=activation_checkpointing)
    return build_model(Glm4vMoeForConditionalGeneration, cfg, env, opts, FREEZE, seed=0)


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


LOSS_TYPES = ("per_token_loss", "default")  # step k uses LOSS_TYPES[k % 2]: one run covers both


def run_parity(env, job: dict) -> dict:
    """`steps` optimizer steps (SGD, activation checkpointing) over the shared micro-batches, the loss type
    alternating per step: losses, grad norms and the recorded gradients of every step."""
    from mmtune.train.trainer import LoopSettings, Trainer

    env = _env(env, job["ep"], job.get("shard_size"))
    steps = job.get("steps", 3)
    model = _build(env, config(job.get("num_experts", 4)), activation_checkpointing=True)
    opt, sched = adamw(model, sgd=True)
    grads, real_step = [], opt.step

    def step():
        grads.append({n: _full(p.grad).clone() for n, p in model.named_parameters()
                      if p.grad is not None and recorded(n)})
        real_step()

    opt.step = step
    ga = MICRO_BATCHES // env.world_size
    s = LoopSettings(train_iters=steps, grad_accum_steps=ga, clip_grad=0.0,
                     pad_token_id=tiny_config().text.pad_token_id)
    trainer = Trainer(s, env, model, opt, sched, ListLoader(rank_batches(range(steps), env.rank, env.world_size)))
    norms = []
    for k in range(steps):
        s.loss_type = LOSS_TYPES[k % 2]
        r = trainer.train_step([trainer._next_batch() for _ in range(ga)])
        trainer.losses.append(r.loss)
        norms.append(r.grad_norm)
    placement = str(model.model.language_model.layers[1].mlp.experts.gate_up_proj.placements)
    return {"losses": trainer.losses, "grad_norms": norms, "grads": grads, "placement": placement}


def run_checkpoint(env, job: dict) -> dict:
    """AdamW with router-bias balancing over the data of steps [first, last); loads `load` first when
    given; saves after `save_step` steps when given. Returns the losses and the routers' biases at the end."""
    from mmtune.train.checkpoint import Checkpointer, TrainState
    from mmtune.train.trainer import LoopSettings, Trainer

    env = _env(env, job["ep"])
    model = _build(env, config(), activation_checkpointing=False)
    opt, sched = adamw(model, lr=1e-2)
    first, last = job["first"], job["last"]
    ga = MICRO_BATCHES // env.world_size
    if job.get("load"):
        Checkpointer.load(job["load"], model, opt, sched)
    s = LoopSettings(train_iters=last, grad_accum_steps=ga, loss_type="per_token_loss", clip_grad=1.0,
                     pad_token_id=tiny_config().text.pad_token_id, router_bias_update_rate=job["bias_rate"])
    batches = rank_batches(range(first, last), env.rank, env.world_size)
    trainer = Trainer(s, env, model, opt, sched, ListLoader(batches))
    for step in range(first + 1, last + 1):
        trainer.losses.append(trainer.train_step([trainer._next_batch() for _ in range(ga)]).loss)
        if step == job.get("save_step"):
            Checkpointer(job["save_dir"]).save(step, model, opt, sched, state=TrainState(step=step))
    return {"losses": trainer.losses, "bias": [g.e_score_correction_bias.clone() for g in trainer.gates]}


def run_dispatch(env, job: dict) -> dict:
    """The all-to-all dispatch alone against every expert on one device, on routings that stress it:
    (a) rank 0 sends every row to rank 1's experts, rank 1 sends to both but gives expert 1 nothing;
    (b) both ranks send everything to rank 1's experts: rank 0's experts get no row at all (their gradient
    must still be a zero tensor: FSDP reduces it on every rank). The ranks hold different numbers of
    tokens. Returns the largest difference."""
    import torch.distributed as dist

    from mmtune.distributed.expert_parallel import apply_expert_parallel
    from mmtune.ops.moe import GroupedExperts

    env = _env(env, 2)
    E, H, I = 4, 16, 8
    torch.manual_seed(0)
    full = GroupedExperts(E, H, I)
    torch.nn.init.normal_(full.gate_up_proj, std=0.2)
    torch.nn.init.normal_(full.down_proj, std=0.2)
    g = torch.Generator().manual_seed(1 + env.rank)
    T = 5 if env.rank == 0 else 11
    x = torch.randn(T, H, generator=g)
    w = torch.rand(T, 2, generator=g)
    mixed = torch.tensor([[2, 3], [3, 2]] * 2 + [[3, 2]]) if env.rank == 0 else \
        torch.tensor([[0, 2], [3, 0], [2, 3]] * 3 + [[0, 3], [0, 2]])
    to_rank1 = torch.tensor([[2, 3], [3, 2]] * (T // 2) + [[3, 2]] * (T % 2))
    weight = torch.arange(H, dtype=torch.float32)
    lo = env.dims.ep_mesh.get_local_rank() * 2
    ep = GroupedExperts(E, H, I)
    ep.load_state_dict(full.state_dict())
    apply_expert_parallel(ep, env.dims.ep_mesh)

    def run(module, ids):
        module.zero_grad(set_to_none=True)
        xx, ww = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = module(xx, ww, ids)
        (out * weight).sum().backward()
        return out.detach(), xx.grad, ww.grad

    diffs = []
    for ids in (mixed, to_rank1):
        ref = run(full, ids)
        ref_grads = [full.gate_up_proj.grad.clone(), full.down_proj.grad.clone()]
        for t in ref_grads:  # the experts' gradient is the sum over both ranks' tokens
            dist.all_reduce(t, group=env.dims.ep_mesh.get_group())
        got = run(ep, ids)
        diffs += [float((a - b).abs().max()) for a, b in zip(got, ref)]
        diffs += [float((p.grad.to_local() - r[lo : lo + 2]).abs().max())
                  for p, r in zip((ep.gate_up_proj, ep.down_proj), ref_grads)]
    return {"max_diff": max(diffs), "tokens": T}


# ------------------------------------------------------------------------------ 1-rank references (pytest)


def one_rank(num_experts: int = 4):
    """The full model every parallel run starts from (build_model's init path: init_weights(seed=0))."""
    from mmtune.train.freeze import apply_freeze

    model = Glm4vMoeForConditionalGeneration(config(num_experts))
    model.init_weights(seed=0)
    apply_freeze(model, FREEZE)
    return model


def settings(**kw):
    """LoopSettings of a 1-rank run that accumulates all 8 micro-batches of a step."""
    from mmtune.train.trainer import LoopSettings

    return LoopSettings(train_iters=10, grad_accum_steps=MICRO_BATCHES, pad_token_id=tiny_config().text.pad_token_id,
                        **kw)


@contextlib.contextmanager
def one_thread():
    """The tiny model's 48-token micro-batches gain nothing from intra-op threads, and on a loaded 2-core
    machine two threads make them several times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_REFERENCE: dict[int, dict] = {}  # by number of experts: 3 steps


def reference(num_experts: int = 4, steps: int = 3) -> dict:
    """The 1-rank run of `run_parity`: the same micro-batches, all 8 of a step accumulated on one rank."""
    if num_experts not in _REFERENCE:
        with one_thread():
            _REFERENCE[num_experts] = _reference(num_experts, 3)
    return {k: v[:steps] for k, v in _REFERENCE[num_experts].items()}


def _reference(num_experts: int, steps: int) -> dict:
    from mmtune.distributed import init_distributed
    from mmtune.train.trainer import Trainer

    model = one_rank(num_experts)
    opt, sched = adamw(model, sgd=True)
    grads, real_step = [], opt.step
    opt.step = lambda: (grads.append({n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.grad is not None and recorded(n)}), real_step())
    s = settings(clip_grad=0.0)
    t = Trainer(s, init_distributed("cpu"), model, opt, sched, ListLoader(rank_batches(range(steps), 0, 1)))
    norms = []
    for k in range(steps):
        s.loss_type = LOSS_TYPES[k % 2]
        r = t.train_step([t._next_batch() for _ in range(MICRO_BATCHES)])
        t.losses.append(r.loss)
        norms.append(r.grad_norm)
    return {"losses": t.losses, "grad_norms": norms, "grads": grads}


def rel(a, b) -> float:
    """max |a - b| / max |b|: the relative error of a whole tensor (or list of numbers)."""
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def assert_parity(got: dict, ref: dict) -> None:
    """A parallel `run_parity` equals the 1-rank run: losses, grad norms and every recorded gradient of
    every step within 1e-5 relative."""
    assert len(got["losses"]) == len(ref["losses"]) == len(got["grads"])
    assert rel(got["losses"], ref["losses"]) <= 1e-5, (got["losses"], ref["losses"])
    assert rel(got["grad_norms"], ref["grad_norms"]) <= 1e-5, (got["grad_norms"], ref["grad_norms"])
    for step, (g, r) in enumerate(zip(got["grads"], ref["grads"])):
        assert set(g) == set(r) and any("experts" in n for n in g)
        for name in r:
            assert rel(g[name], r[name]) <= 1e-5, (step, name, rel(g[name], r[name]))


RUNS = {"parity": run_parity, "checkpoint": run_checkpoint, "dispatch": run_dispatch}


def run_all(env, runs: list[dict], out: str) -> None:
    """Run each configuration in turn; rank 0 saves the list of results to `out`. Collective."""
    import torch.distributed as dist

    results = []
    for run in runs:
        t0 = time.perf_counter()
        mine = RUNS[run["kind"]](env, run)
        if run["kind"] == "dispatch":  # per-rank results; the others are the same on every rank
            gathered = [None] * env.world_size
            dist.all_gather_object(gathered, mine)
            mine = gathered
        results.append(mine)
        if env.rank == 0:
            print(f"run {run}: {time.perf_counter() - t0:.1f} s", flush=True)
    if env.rank == 0:
        torch.save(results, out)


def main(job_path: str) -> None:
    import torch.distributed as dist

    from mmtune.distributed import init_distributed

    job = json.loads(open(job_path).read())
    env = init_distributed("cpu")
    if env.rank == 0:
        print(f"started: {time.perf_counter() - T0:.1f} s after the imports began", flush=True)
    run_all(env, job["runs"], job["out"])
    if job.get("gpu_train_argv"):  # bench/gpu_train.py's EP mode, dry run on the same ranks (it ends the group)
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
        import gpu_train

        os.environ["OUT"] = job["gpu_train_out"]
        assert gpu_train.main(job["gpu_train_argv"]) == 0
    if dist.is_initialized():
        dist.destroy_process_group()
    if env.rank == 0:
        print(f"done: {time.perf_counter() - T0:.1f} s after the imports began", flush=True)

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main(sys.argv[1])
