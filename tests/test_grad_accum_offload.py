"""Gradient accumulation holds only sharded gradients, and CPU offload trains like no offload — on 2 gloo
ranks, in one torchrun launch of this file (the worker at the bottom):

- a ~20M-parameter GLM-4.5V-architecture model (bench/grad_accum_memory.py measures), one step of grad-accum 1
  (micro-batch 4) vs grad-accum 4 (micro-batch 1), same global batch, per_token_loss: between micro-batches a
  rank holds half the fp32 gradient (its shard) and the step's peak RSS exceeds grad-accum 1 by well under
  the full gradient; the previous schedule (no gradient sync until the window's last micro-batch), run in
  the same launch, holds the whole gradient and peaks higher — the measurement sees an unsharded gradient
  when one is held. The step's loss and gradient norm agree with the old schedule and with grad-accum 1;
- on the tiny model, 3 steps of grad-accum 2 with clipping + AdamW: equal to grad-accum 1 (per_token split
  invariance across optimizer steps); FSDP2 `CPUOffloadPolicy` (offload_to_cpu) + save/resume equals the
  same run without offload, step by step, and the resumed run continues exactly; HSDP equals FSDP, and
  counting the collectives shows every micro-batch reduce-scatters while only the window's last one
  all-reduces across the replicas.
Plus, in one process: the FSDP forward-prefetch chain follows the order forward runs the blocks, and the
CUDA process group has a CPU backend next to NCCL.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from test_train_helpers import ListLoader, make_sample, windows_for  # noqa: E402

# (the worker at the bottom runs under torchrun; pytest collects only the test_ functions)


def _bench():
    """bench/grad_accum_memory.py (the measurement lives there, so the benchmark and this test agree)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("grad_accum_memory", HERE.parent / "bench" / "grad_accum_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def dist_result(tmp_path_factory):
    from dist_utils import torchrun

    root = tmp_path_factory.mktemp("grad_accum_offload")
    # every allocation >= 1 MiB is its own mmap, returned to the OS when freed: RSS follows live tensors
    env = {"PYTHONPATH": f"{HERE}:{HERE.parent}", "MALLOC_MMAP_THRESHOLD_": str(2**20)}  # as the bench's launch
    proc = torchrun([str(Path(__file__)), str(root)], nproc=2, env=env)
    result = json.loads((root / "result.json").read_text())
    result["log"] = proc.stdout + proc.stderr
    return result


def test_grad_accum_holds_only_sharded_gradients(dist_result):
    m = dist_result["memory"]
    full = 4 * m["trainable_params"]  # bytes of the whole fp32 gradient: what the old schedule held unsharded
    assert m["trainable_params"] > 15e6, m
    frac = {k: {run: round(b / full, 3) for run, b in m[k].items()} for k in ("peak", "held")}
    # between micro-batches a rank holds its gradient shard (1/2 of the gradient on 2 ranks); the old schedule
    # held the whole unsharded gradient, and the RSS measurement sees it
    assert frac["held"]["ga4"] < 0.7 and frac["held"]["ga4_no_sync"] > 0.85, frac
    # the step's peak: grad-accum 4 adds well under the full gradient to grad-accum 1; the old one added more
    extra_new = (m["peak"]["ga4"] - m["peak"]["ga1"]) / full
    extra_old = (m["peak"]["ga4_no_sync"] - m["peak"]["ga1"]) / full
    assert extra_new < 0.4 and extra_old > extra_new + 0.15, frac
    # the same numbers as today: the step's loss and gradient norm as the old schedule's and grad-accum 1's
    # (that the update then continues like grad-accum 1: test_cpu_offload..., 3 steps on the tiny model)
    close = lambda a, b: abs(a - b) <= 1e-6 * abs(a)  # noqa: E731
    for key in ("losses", "grad_norms"):
        assert [len(v) for v in m[key].values()] == [1, 1, 1], m[key]
        assert close(m[key]["ga4_no_sync"][0], m[key]["ga4"][0]) and close(m[key]["ga1"][0], m[key]["ga4"][0]), m[key]


def test_cpu_offload_equals_no_offload_with_clip_and_resume(dist_result):
    o = dist_result["offload"]
    # grad-accum 2 (micro-batch 1, the runs below) equals grad-accum 1 (micro-batch 2) over 3 optimizer steps
    for key, rel in (("losses", 1e-6), ("grad_norms", 1e-5)):
        assert len(o["ga1"][key]) == len(o["plain"][key]) == 3, o
        assert all(abs(a - b) <= rel * abs(a) for a, b in zip(o["ga1"][key], o["plain"][key])), o
    assert o["offloaded"] == [False, True]  # FSDP2's CPUOffloadPolicy is on in the offload runs only
    for a, b in zip(o["plain"]["losses"], o["offload"]["losses"]):
        assert abs(a - b) <= 1e-6 * abs(a), o
    for a, b in zip(o["plain"]["grad_norms"], o["offload"]["grad_norms"]):
        assert abs(a - b) <= 1e-5 * abs(a), o
    assert max(o["plain"]["grad_norms"]) > o["clip"], "clipping must be active in this check"
    assert o["resumed"]["losses"] == o["offload"]["losses"][2:], o
    assert o["max_param_diff"] < 1e-6 and o["max_resumed_param_diff"] == 0.0, o


def test_hsdp_grad_accum_defers_only_the_all_reduce(dist_result):
    o = dist_result["offload"]
    # [reductions (reduce-scatters), all-reduces across replicas] per micro-batch, 3 steps of 2 micro-batches:
    # every micro-batch reduce-scatters each FSDP unit that has trainable parameters; under HSDP only the
    # window's last micro-batch all-reduces (once per unit), under FSDP (no replicas) none does
    units = o["reductions"]["fsdp"][0][0]
    assert units > 1, o["reductions"]
    assert o["reductions"]["fsdp"] == [[units, 0]] * 6, o["reductions"]
    assert o["reductions"]["hsdp"] == [[units, 0], [units, units]] * 3, o["reductions"]
    for a, b in zip(o["plain"]["losses"], o["hsdp"]["losses"]):
        assert abs(a - b) <= 1e-6 * abs(a), o
    # the first step starts from the same parameters: only the order of the gradient sums differs
    a, b = o["plain"]["grad_norms"][0], o["hsdp"]["grad_norms"][0]
    assert abs(a - b) <= 1e-6 * abs(a), o
    # AdamW (lr 1e-2) turns the last-bit differences of the summation order into ~1e-5 parameter differences
    # (an element whose gradient is ~0 steps by up to lr either way), so the later steps' gradient norms agree
    # as closely as grad-accum 2's with grad-accum 1's (test_cpu_offload_equals_no_offload_with_clip_and_resume)
    for a, b in zip(o["plain"]["grad_norms"][1:], o["hsdp"]["grad_norms"][1:]):
        assert abs(a - b) <= 1e-5 * abs(a), o
    assert o["max_hsdp_param_diff"] < 2e-4, o
    # with SGD (no such amplification) HSDP's deferred all-reduce equals FSDP at every step to 1e-6
    for key in ("losses", "grad_norms"):
        assert len(o["hsdp_sgd"][key]) == 3, o
        for a, b in zip(o["plain_sgd"][key], o["hsdp_sgd"][key]):
            assert abs(a - b) <= 1e-6 * abs(a), (key, o["plain_sgd"], o["hsdp_sgd"])
    assert o["max_hsdp_sgd_param_diff"] < 1e-7, o  # (7.5e-9 seen)


def test_forward_prefetch_follows_execution_order():
    from mmtune.distributed.parallelize import forward_order
    from test_train_helpers import collate, full_model

    model = full_model(0)
    order = forward_order(model)
    seen = []
    for module in order:
        module.register_forward_pre_hook(lambda m, a: seen.append(m) if m not in seen else None)
    batch = collate([make_sample(0)])
    with torch.no_grad():
        model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
    assert [id(m) for m in seen] == [id(m) for m in order]
    assert order[1] is model.model.visual.blocks[0]  # the vision tower runs between embedding and decoder


def test_parallelize_prefetches_in_execution_order(dist_result):
    fwd, bwd = dist_result["prefetch"]["forward"], dist_result["prefetch"]["backward"]
    embed, vision, layers = "model.language_model.embed_tokens", "model.visual.blocks.", "model.language_model.layers."
    order = [embed, vision + "0", vision + "1", layers + "0", layers + "1", layers + "2"]
    assert fwd == [[a, [b]] for a, b in zip(order, order[1:])]  # embedding -> vision tower -> decoder
    assert bwd == [[vision + "1", [vision + "0"]], [layers + "0", [embed]], [layers + "1", [layers + "0"]],
                   [layers + "2", [layers + "1"]]]


def test_process_group_backend_has_a_cpu_backend_on_cuda():
    from mmtune.distributed.env import process_group_backend

    assert process_group_backend("cuda") == "cuda:nccl,cpu:gloo"
    assert process_group_backend("cuda", "nccl") == "cuda:nccl,cpu:gloo"
    assert process_group_backend("cuda", "gloo") == "gloo"
    assert process_group_backend("cpu") == process_group_backend("cpu", "auto") == "gloo"
    with pytest.raises(ValueError, match="nccl needs CUDA"):
        process_group_backend("cpu", "nccl")


# ------------------------------------------------------------------------------------------- worker


class _CountReductions:
    """Per micro-batch of `model` (each root forward starts one): [FSDP gradient reductions, all-reduces run
    inside them]. A reduction is FSDP2's `foreach_reduce` (the reduce-scatter over the shard group; a copy
    into the shard when that group has 1 rank); the all-reduce inside it is the one across HSDP replicas."""

    def __init__(self, model):
        import torch.distributed as dist
        from torch.distributed.fsdp._fully_shard import _fsdp_param_group

        self.counts: list[list[int]] = []
        self._modules = (_fsdp_param_group, dist)
        self._orig = (_fsdp_param_group.foreach_reduce, dist.all_reduce)
        self._inside = False
        model.register_forward_pre_hook(lambda m, a: self.counts.append([0, 0]))

    def _reduce(self, *args, **kwargs):
        self.counts[-1][0] += 1
        self._inside = True
        try:
            return self._orig[0](*args, **kwargs)
        finally:
            self._inside = False

    def _all_reduce(self, *args, **kwargs):
        if self._inside:
            self.counts[-1][1] += 1
        return self._orig[1](*args, **kwargs)

    def __enter__(self):
        self._modules[0].foreach_reduce, self._modules[1].all_reduce = self._reduce, self._all_reduce
        return self

    def __exit__(self, *exc):
        self._modules[0].foreach_reduce, self._modules[1].all_reduce = self._orig


def _offload_checks(env, root: Path) -> dict:
    """3 steps of 2 micro-batches with clipping and AdamW, with and without CPU offload; the offload run saves
    after step 2, and a fresh offload model resumes from it for step 3. The plain run again as grad-accum 1
    (micro-batch 2) and as HSDP; the plain and HSDP runs count their gradient reductions per micro-batch."""
    import contextlib
    from dataclasses import replace

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmtune.distributed import FSDPOptions
    from mmtune.distributed.parallel_dims import ParallelDims
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config
    from mmtune.train.checkpoint import Checkpointer, TrainState
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.train.trainer import LoopSettings, Trainer
    from test_train_helpers import adamw

    clip = 0.5
    freeze = FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False)
    steps = [[make_sample(200 + 4 * k + j, with_image=(j < 2)) for j in range(4)] for k in range(3)]
    reductions = {}

    def run(offload: bool, save: Path | None = None, resume: Path | None = None, run_env=env, mbs: int = 1,
            count: str | None = None, sgd: bool = False):
        torch.manual_seed(0)
        model = build_model(Glm4vMoeForConditionalGeneration, tiny_config(), run_env,
                            FSDPOptions(cpu_offload=offload), freeze, seed=0)
        opt, sched = adamw(model, sgd=sgd)
        s = LoopSettings(train_iters=3, grad_accum_steps=2 // mbs, loss_type="per_token_loss", clip_grad=clip,
                         save_interval=2 if save else None)
        loader = ListLoader([b for k in range(3) for b in windows_for(steps[k], mbs, env.rank, 2)])
        t = Trainer(s, run_env, model, opt, sched, loader, checkpointer=Checkpointer(save) if save else None)
        state = TrainState()
        if resume is not None:
            state = Checkpointer.load(resume, model, opt, sched, loader)
        norms = []
        train_step = t.train_step

        def recording_step(window):
            r = train_step(window)
            norms.append(r.grad_norm)
            return r

        t.train_step = recording_step
        with _CountReductions(model) if count else contextlib.nullcontext() as counter:
            t.fit(state)
        if count:
            reductions[count] = counter.counts
        offloaded = all(fp.offload_to_cpu for fp in model.lm_head._get_fsdp_state()._fsdp_param_group.fsdp_params)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {"losses": t.losses, "grad_norms": norms}, sd, offloaded

    plain, sd_plain, plain_offloaded = run(False, count="fsdp")
    ga1, _, _ = run(False, mbs=2)
    offload, sd_off, offloaded = run(True, save=root / "offload_save")
    resumed, sd_res, _ = run(True, resume=root / "offload_save" / "iter_0000002")
    # HSDP (2 replicas of 1-rank shard groups): the all-reduce across replicas waits for the last micro-batch
    hsdp_env = replace(env, dims=ParallelDims.from_config(env.world_size, 1).build_meshes("cpu"))
    hsdp, sd_hsdp, _ = run(False, run_env=hsdp_env, count="hsdp")
    hdiff = max((float((sd_plain[k] - sd_hsdp[k]).abs().max()) for k in sd_plain), default=0.0)
    # the same pair with SGD, whose update is linear in the gradient: no amplification of the sums' order
    plain_sgd, sd_plain_sgd, _ = run(False, sgd=True)
    hsdp_sgd, sd_hsdp_sgd, _ = run(False, run_env=hsdp_env, sgd=True)
    hdiff_sgd = max((float((sd_plain_sgd[k] - sd_hsdp_sgd[k]).abs().max()) for k in sd_plain_sgd), default=0.0)
    diff = max((float((sd_plain[k] - sd_off[k]).abs().max()) for k in sd_plain), default=0.0)  # {} on rank 1
    rdiff = max((float((sd_off[k] - sd_res[k]).abs().max()) for k in sd_off), default=0.0)
    return {"plain": plain, "offload": offload, "resumed": resumed, "clip": clip, "offloaded": [plain_offloaded, offloaded],
            "max_param_diff": diff, "max_resumed_param_diff": rdiff, "hsdp": hsdp, "max_hsdp_param_diff": hdiff,
            "ga1": ga1, "reductions": reductions, "plain_sgd": plain_sgd, "hsdp_sgd": hsdp_sgd,
            "max_hsdp_sgd_param_diff": hdiff_sgd}


def _prefetch_chains(env) -> dict:
    """The forward/backward prefetch targets parallelize sets (num_to_*_prefetch 1), by module name."""
    from torch.distributed.fsdp import FSDPModule

    from mmtune.distributed import FSDPOptions
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model

    calls = {"forward": [], "backward": []}
    originals = {k: getattr(FSDPModule, f"set_modules_to_{k}_prefetch") for k in calls}

    def recorder(kind):
        def record(self, modules):
            calls[kind].append((self, list(modules)))
            return originals[kind](self, modules)
        return record

    for kind in calls:
        setattr(FSDPModule, f"set_modules_to_{kind}_prefetch", recorder(kind))
    try:
        model = build_model(Glm4vMoeForConditionalGeneration, tiny_config(), env,
                            FSDPOptions(forward_prefetch=1, backward_prefetch=1),
                            FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False), seed=0)
    finally:
        for kind, fn in originals.items():
            setattr(FSDPModule, f"set_modules_to_{kind}_prefetch", fn)
    names = {id(m): n for n, m in model.named_modules()}
    return {kind: [[names[id(m)], [names[id(t)] for t in targets]] for m, targets in c] for kind, c in calls.items()}


def _worker(root: str) -> None:
    from mmtune.distributed import init_distributed

    env = init_distributed("cpu")
    bench = _bench()
    result = {"memory": bench.measure(env, bench.model_config(), steps=1), "offload": _offload_checks(env, Path(root)),
              "prefetch": _prefetch_chains(env)}
    if env.rank == 0:
        (Path(root) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(sys.argv[1])
    from mmtune.distributed import shutdown_distributed

    shutdown_distributed()  # gloo's threads stop here, not in the interpreter's teardown
