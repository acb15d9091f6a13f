"""Context-parallel exactness: the batches, the 1-rank reference and the torchrun worker that
tests/test_context_parallel.py launches (no tests here; pytest collects nothing from this file):

    torchrun --nproc_per_node N tests/context_parallel_job.py JOB.json

Every layout trains 3 steps on the same global batches (2 micro-batches a step: grad-accum 2 on one dp
rank, or one micro-batch on each of 2 dp ranks) and compares, on rank 0, each step's loss and every
parameter's gradient with the 1-rank reference that the test computed first (REFERENCE file).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from mmtune.data.collate import Sample, collate
from mmtune.models.glm4v_moe import tiny_config
from mmtune.models.glm4v_moe.rope import get_rope_index
from mmtune.train.freeze import FreezeSpec

SEQ = 45  # odd: padded to 46 (cp 2) and 48 (cp 4)
STEPS = 3


@dataclass(frozen=True)
class Case:
    """One loss configuration, run on the reference and on every layout."""

    name: str
    loss_type: str
    compute_mode: str
    freeze: FreezeSpec
    arch: str = "glm4v_moe"  # config.json model_type (mmtune.models): the dense glm4v has no router aux loss

    def settings(self, grad_accum_steps: int):
        from mmtune.train.trainer import LoopSettings

        t = self.architecture.tiny_config().text
        moe = self.architecture.has_experts
        return LoopSettings(train_iters=STEPS, grad_accum_steps=grad_accum_steps, loss_type=self.loss_type,
                            compute_mode=self.compute_mode, chunk_size=16, router_aux_loss_coef=0.1 if moe else 0.0,
                            pad_token_id=t.pad_token_id, num_experts=t.n_routed_experts if moe else None,
                            top_k=t.num_experts_per_tok if moe else None)

    @property
    def architecture(self):
        from mmtune.models import get_architecture

        return get_architecture(self.arch)

    def model(self):
        return self.architecture.model_class(self.architecture.tiny_config())


CASES = [
    # vision tower and projector frozen: the image features are gathered without autograd
    Case("per_token_frozen_tower", "per_token_loss", "chunk", FreezeSpec(vision_encoder=True, vision_projector=True, text_decoder=False)),
    # everything trains: the gathered features send their gradients back to the rank that encoded them
    Case("per_sample_trainable_tower", "per_sample_loss", "default", FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False)),
    # the dense GLM-4.1V model (its own attention and four norms per layer), towers trainable
    Case("dense_per_token", "per_token_loss", "chunk", FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False), "glm4v"),
]


def _sample(seed: int, length: int, items: tuple = ()) -> Sample:
    """Random text with images ("image", (h, w)) and videos ("video", (t, h, w)) laid out as the processor
    does near the start (a video: per temporal patch <|begin_of_image|> placeholders <|end_of_image|> and a
    timestamp token, inside <|begin_of_video|> ... <|end_of_video|>); labels on the text after them."""
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (length,), generator=g).tolist()
    pixels, grids, video_pixels, video_grids, at = [], [], [], [], 1
    for kind, shape in items:
        t, h, w = (1, *shape) if kind == "image" else shape
        span = [cfg.image_start_token_id] + [cfg.image_token_id] * (h * w // 4) + [cfg.image_end_token_id]
        if kind == "image":
            pixels.append(torch.randn(h * w, cfg.vision.patch_dim, generator=g).numpy())
            grids.append([1, h, w])
        else:
            span = [cfg.video_start_token_id] + (span + [7]) * t + [cfg.video_end_token_id]
            video_pixels.append(torch.randn(t * h * w, cfg.vision.patch_dim, generator=g).numpy())
            video_grids.append([t, h, w])
        ids[at : at + len(span)] = span
        at += len(span)
    ids = torch.tensor(ids[:length])
    start = max(at, length // 3)
    labels = torch.full((length,), -100)
    labels[start:-1] = ids[start + 1 :]
    pos, _ = get_rope_index(ids, torch.tensor(grids) if grids else None,
                            torch.tensor(video_grids) if video_grids else None, image_token_id=cfg.image_token_id,
                            video_start_token_id=cfg.video_start_token_id, video_end_token_id=cfg.video_end_token_id,
                            spatial_merge_size=2)
    cat = lambda xs: np.concatenate(xs) if xs else None  # noqa: E731
    return Sample(ids, labels, pos, cat(pixels), grids, "cp", cat(video_pixels), video_grids)


def micro_batches(step: int) -> list[dict]:
    """The 2 micro-batches (2 packed rows of SEQ tokens each) of one step. Samples straddle every split
    point; one row is text only; images of 4, 8 and 16 tokens and a video of 2 x 4 tokens; step 1's second
    micro-batch has no image and no video."""
    pad = tiny_config().text.pad_token_id
    s = 100 * step
    video = () if step == 1 else (("video", (2, 4, 4)),)
    mb0 = [[_sample(s + 1, 21, (("image", (4, 4)),)), _sample(s + 2, 17, (("image", (4, 8)),))],  # 38 + 7 pad
           [_sample(s + 3, 25), _sample(s + 4, 14)]]  # text only, 39 + 6 pad
    mb1 = [[_sample(s + 5, 40, () if step == 1 else (("image", (4, 4)), ("image", (8, 8))))],  # 40 + 5 pad
           [_sample(s + 6, 12), _sample(s + 7, 22, video), _sample(s + 8, 11)]]  # 45: no padding
    return [collate(rows, pad_id=pad, pad_to=SEQ) for rows in (mb0, mb1)]


def _record_grads(trainer, grads: list, full) -> None:
    """Keep each step's gradients (before the optimizer moves the parameters)."""

    def record(optimizer, args, kwargs):
        grads.append({n: full(p.grad).clone() for n, p in trainer.model.named_parameters() if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(record)


def run_case(trainer, num_windows: int, grad_accum_steps: int, full) -> dict:
    grads: list[dict] = []
    _record_grads(trainer, grads, full)
    losses = []
    for _ in range(num_windows):
        window = [trainer._to_device(trainer._next_batch()) for _ in range(grad_accum_steps)]
        losses.append(trainer.train_step(window).loss)
    return {"losses": losses, "grads": grads}


def reference(case: Case) -> dict:
    """The 1-rank run: grad-accum 2 over each step's 2 micro-batches, SGD."""
    from mmtune.distributed import init_distributed
    from mmtune.train.freeze import apply_freeze
    from mmtune.train.trainer import Trainer
    from test_train_helpers import ListLoader, adamw

    env = init_distributed("cpu")
    assert not env.distributed
    model = case.model()
    model.init_weights(seed=0)
    apply_freeze(model, case.freeze)
    opt, sched = adamw(model, lr=0.05, sgd=True)
    batches = [mb for k in range(STEPS) for mb in micro_batches(k)]
    trainer = Trainer(case.settings(2), env, model, opt, sched, ListLoader(batches))
    return run_case(trainer, STEPS, 2, lambda g: g)


def compare(got: dict, ref: dict) -> dict:
    """Per step: the loss's relative error and the worst parameter's |g - g_ref| / |g_ref| (L2 norms)."""
    out = []
    for k in range(STEPS):
        a, b = got["losses"][k], ref["losses"][k]
        worst, name = 0.0, None
        assert set(got["grads"][k]) == set(ref["grads"][k]), "different trainable parameters"
        for n, g in got["grads"][k].items():
            r = ref["grads"][k][n]
            err = float((g.double() - r.double()).norm() / r.double().norm().clamp(min=1e-30))
            if err > worst:
                worst, name = err, n
        out.append({"loss": a, "ref_loss": b, "loss_rel": abs(a - b) / abs(b), "grad_rel": worst, "worst": name})
    return out


# ------------------------------------------------------------------------------------------- worker


def _worker(job_path: str) -> None:
    job = json.loads(open(job_path).read())
    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.train.model_build import build_model
    from mmtune.train.trainer import Trainer
    from test_train_helpers import ListLoader, adamw

    refs = torch.load(job["reference"], weights_only=True)
    result = {}
    for layout in job["layouts"]:  # {"name", "cp", "sharding_size", "ep", "recompute", "cases"}
        env = init_distributed("cpu", cp=layout["cp"], shard_size=layout.get("sharding_size"), ep=layout.get("ep", 1))
        dp, G = env.dp_size, 2 // env.dp_size
        for case in (c for c in CASES if c.name in layout["cases"]):
            t0 = time.perf_counter()
            torch.manual_seed(0)
            opts = FSDPOptions(activation_checkpointing=layout.get("recompute", False))
            arch = case.architecture
            model = build_model(arch.model_class, arch.tiny_config(), env, opts, case.freeze, seed=0)
            opt, sched = adamw(model, lr=0.05, sgd=True)
            # dp rank r takes micro-batch r of each step (dp 2) or both, in order (dp 1)
            mine = [mb for k in range(STEPS) for i, mb in enumerate(micro_batches(k)) if i % dp == env.dp_rank]
            trainer = Trainer(case.settings(G), env, model, opt, sched, ListLoader(mine))
            got = run_case(trainer, STEPS, G, lambda g: g.full_tensor())
            if env.rank == 0:
                result[f"{layout['name']}/{case.name}"] = compare(got, refs[case.name])
                result.setdefault("seconds", {})[f"{layout['name']}/{case.name}"] = time.perf_counter() - t0
    if int(os.environ["RANK"]) == 0:
        with open(job["out"], "w") as f:
            json.dump(result, f)
    if job.get("gpu_bench_argv"):  # bench/gpu_train.py's CPU dry run, in this process group
        import importlib.util
        from pathlib import Path

        path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
        spec = importlib.util.spec_from_file_location("gpu_train_bench", path)
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
        assert bench.main(job["gpu_bench_argv"]) == 0
    if job.get("cli_argv"):  # `mmtune train` on these ranks (it ends the process group)
        from mmtune.train.cli import main

        assert main(job["cli_argv"]) == 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(sys.argv[1])
    from mmtune.distributed import shutdown_distributed

    shutdown_distributed()  # gloo's threads stop here, not in the interpreter's teardown
