"""Shared helpers for the trainer tests (synthetic batches in the INTERNALS "A training batch" format, a
small model/optimizer factory) and the torchrun worker that the distributed tests launch:

    torchrun --nproc_per_node 2 tests/test_train_helpers.py JOB.json

No tests here; pytest collects nothing from this file.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config




def make_sample(seed: int, seq: int = 24, with_image: bool = True) -> dict:
    """One synthetic sample: token ids in the ordinary vocab, labels already shifted (the answer half),
    and optionally one image of grid [1, 4, 4] (16 patches -> 4 image tokens)."""
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (seq,), generator=g)
    pixel_values = grid = None
    if with_image:
        ids[2:6] = cfg.image_token_id
        pixel_values = torch.randn(16, cfg.vision.patch_dim, generator=g)
        grid = torch.tensor([[1, 4, 4]])
    labels = torch.full((seq,), -100)
    labels[seq // 2 : -1] = ids[seq // 2 + 1 :]
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "image_grid_thw": grid}


def collate(samples: list[dict]) -> dict:
    """Equal-length rows (no padding needed): positions computed by the model, no cu_seqlens."""
    pv = [s["pixel_values"] for s in samples if s["pixel_values"] is not None]
    grids = [s["image_grid_thw"] for s in samples if s["image_grid_thw"] is not None]
    batch = {"input_ids": torch.stack([s["input_ids"] for s in samples]),
             "labels": torch.stack([s["labels"] for s in samples]), "num_samples": len(samples)}
    if pv:
        batch["pixel_values"] = torch.cat(pv)
        batch["image_grid_thw"] = torch.cat(grids)
    return batch


class ListLoader:
    """A re-iterable list of batches with the StatefulDataLoader state protocol."""

    def __init__(self, batches: list[dict]):
        self.batches = batches
        self.pos = 0

    def __iter__(self):
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, sd):
        self.pos = sd["pos"]


def full_model(seed: int = 0) -> Glm4vMoeForConditionalGeneration:
    model = Glm4vMoeForConditionalGeneration(tiny_config())
    model.init_weights(seed=seed)
    return model


def adamw(model, lr: float = 1e-2, sgd: bool = False):
    """AdamW (or plain SGD, whose update is linear in the gradient: parity tests compare parameters
    after steps, which Adam's g/sqrt(v) makes ill-conditioned for near-zero gradients)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if sgd:
        opt = torch.optim.SGD(params, lr=lr, foreach=True)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, foreach=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def windows_for(samples: list[dict], mbs: int, rank: int = 0, dp: int = 1) -> list[dict]:
    """Micro-batches of one rank for a global batch = `samples` in order: rank r takes samples
    [r*n/dp, (r+1)*n/dp), split into micro-batches of mbs."""
    n = len(samples) // dp
    mine = samples[rank * n : (rank + 1) * n]
    return [collate(mine[i : i + mbs]) for i in range(0, len(mine), mbs)]


def make_workdir(root, tiny_hf_dir, shapes_dir, max_samples: int = 24):
    """data.json / model.json for `mmtune train` on the tiny model and the shapes data (llava-to-mllm'd);
    vision encoder frozen (the recipe's default), per_token_loss."""
    from pathlib import Path

    from mmtune.data.llava import llava_to_mllm

    root, shapes_dir = Path(root), Path(shapes_dir)
    if not (shapes_dir / "mllm_train.json").exists():
        llava_to_mllm(shapes_dir / "llava_format.json", shapes_dir / "mllm_train.json")
    repo = Path(__file__).resolve().parents[1]
    data = json.loads((repo / "mmtune/examples/tiny/data.json").read_text())
    data["dataset_param"]["preprocess_parameters"]["model_name_or_path"] = str(tiny_hf_dir)
    data["dataset_param"]["basic_parameters"].update(dataset_dir=str(shapes_dir), dataset="mllm_train.json",
                                                     cache_dir=None, preprocessing_num_workers=None,
                                                     max_samples=max_samples)
    data["dataloader_param"]["num_workers"] = 0
    (root / "data.json").write_text(json.dumps(data))
    model = json.loads((repo / "mmtune/examples/tiny/model.json").read_text())
    model["init_from_hf_path"] = str(tiny_hf_dir)
    model["image_encoder"]["vision_encoder"]["freeze"] = True
    model["loss_cfg"]["loss_type"] = "per_token_loss"
    (root / "model.json").write_text(json.dumps(model))
    return root


def train_argv(work, save, iters, *extra):
    """`mmtune train` flags for the tiny run: 2 x 2 micro-batches of <= 96 tokens per step, seed 7."""
    return ["--mm-data", str(work / "data.json"), "--mm-model", str(work / "model.json"),
            "--micro-batch-size", "2", "--global-batch-size", "4", "--seq-length", "96",
            "--train-iters", str(iters), "--lr", "2e-3", "--lr-warmup-iters", "1", "--clip-grad", "1.0",
            "--log-interval", "1", "--num-workers", "0", "--seed", "7", "--save", str(save), *extra]


# ------------------------------------------------------------------------------------------- worker


def _worker(job_path: str) -> None:
    """All 2-rank checks in one torchrun launch (startups are the expensive part). Rank 0 writes JSON:
    per_token split 2 ranks x 2 (1 step; grads), 2-rank FSDP2 3 steps with a text-only rank, activation
    checkpointing and prefetching (losses, params); the HF reader into every DTensor layout (job["hf_dir"]); then
    `mmtune train` itself on the 2 ranks, once per job["cli_argvs"] entry, each writing its save dir."""
    job = json.loads(open(job_path).read())
    out_path = job["out"]
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from mmtune.distributed import FSDPOptions, init_distributed
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.train.trainer import LoopSettings, Trainer

    env = init_distributed("cpu")
    result = {}
    freeze = FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False)

    def sharded(opts=None):
        torch.manual_seed(0)
        return build_model(Glm4vMoeForConditionalGeneration, tiny_config(), env, opts or FSDPOptions(), freeze, seed=0)

    def full_sd(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.tolist() for k, v in sd.items() if "visual.blocks.0.attn" in k or "layers.2.mlp.experts" in k
                or "lm_head" in k or "merger" in k}

    import time
    t0 = time.perf_counter()
    # (1) per_token_loss, one global batch of 4 as 2 ranks x 2: loss and the gradients
    samples = [make_sample(i) for i in range(4)]
    model = sharded()
    t1 = time.perf_counter()
    opt, sched = adamw(model, sgd=True)
    grads = {}
    opt.step = lambda: grads.update({n: p.grad.full_tensor().tolist() for n, p in model.named_parameters()
                                     if p.grad is not None})
    s = LoopSettings(train_iters=1, grad_accum_steps=1, loss_type="per_token_loss")
    trainer = Trainer(s, env, model, opt, sched, ListLoader(windows_for(samples, 2, env.rank, 2)))
    window = [trainer._next_batch()]
    r = trainer.train_step(window)
    result["per_token_2x2"] = {"loss": r.loss, "grad_norm": r.grad_norm, "grads": grads}
    t2 = time.perf_counter()

    # (2) 3 steps, 2 ranks, default loss, rank 1's batches text-only: losses and params
    steps = [[make_sample(100 + 4 * k + j, with_image=(j < 2)) for j in range(4)] for k in range(3)]
    # with per-block activation checkpointing and explicit prefetching, which must not change the numbers
    model = sharded(FSDPOptions(activation_checkpointing=True, forward_prefetch=1, backward_prefetch=1))
    opt, sched = adamw(model, sgd=True)
    batches = [b for k in range(3) for b in windows_for(steps[k], 2, env.rank, 2)]
    s = LoopSettings(train_iters=3, grad_accum_steps=1, loss_type="per_token_loss")
    trainer = Trainer(s, env, model, opt, sched, ListLoader(batches))
    for _ in range(3):
        batch = trainer._next_batch()
        if env.rank == 1:
            assert "pixel_values" not in batch, "rank 1 must be text-only in this check"
        trainer.losses.append(trainer.train_step([batch]).loss)
    result["three_steps"] = {"losses": trainer.losses, "params": full_sd(model)}

    # (2b) the same 3 steps as HSDP with shard groups of 1 rank (fsdp2 sharding_size 1): 2 replicas
    from dataclasses import replace

    from mmtune.distributed.parallel_dims import ParallelDims

    hsdp_env = replace(env, dims=ParallelDims.from_config(env.world_size, 1).build_meshes("cpu"))
    torch.manual_seed(0)
    model = build_model(Glm4vMoeForConditionalGeneration, tiny_config(), hsdp_env, FSDPOptions(), freeze, seed=0)
    opt, sched = adamw(model, sgd=True)
    trainer = Trainer(s, hsdp_env, model, opt, sched, ListLoader(batches))
    for _ in range(3):
        trainer.losses.append(trainer.train_step([trainer._next_batch()]).loss)
    result["three_steps_hsdp"] = {"losses": trainer.losses, "params": full_sd(model)}

    # (2c) the dense glm4v model, the same 3 steps: FSDP with activation checkpointing, and HSDP
    from mmtune.models.glm4v import Glm4vForConditionalGeneration, tiny_config as dense_tiny_config

    for run, run_env, opts in (("dense_fsdp_recompute", env, FSDPOptions(activation_checkpointing=True)),
                               ("dense_hsdp", hsdp_env, FSDPOptions())):
        torch.manual_seed(0)
        model = build_model(Glm4vForConditionalGeneration, dense_tiny_config(), run_env, opts, freeze, seed=0)
        opt, sched = adamw(model, sgd=True)
        trainer = Trainer(s, run_env, model, opt, sched, ListLoader(batches))
        for _ in range(3):
            trainer.losses.append(trainer.train_step([trainer._next_batch()]).loss)
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result[run] = {"losses": trainer.losses, "params": {
            k: v.tolist() for k, v in sd.items() if "layers.1." in k or "lm_head" in k or "merger.proj" in k}}
    result["times"] = [t1 - t0, t2 - t1, time.perf_counter() - t2]
    # (3) bf16 mixed precision (as on CUDA): decoder weights gathered in bf16, routers kept fp32
    model = sharded(FSDPOptions(param_dtype=torch.bfloat16, reduce_dtype=torch.float32))
    seen = {}
    layer = model.model.language_model.layers[2]

    def record(key):
        def hook(module, args):
            seen.setdefault(key, str(module.weight.dtype))  # returns None: the inputs stay as they are
        return hook

    layer.mlp.gate.register_forward_pre_hook(record("router"))
    layer.self_attn.q_proj.register_forward_pre_hook(record("q_proj"))
    batch = windows_for(samples, 2, env.rank, 2)[0]
    out = model(input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"), return_logits=False, run_vision_without_images=True)
    out.hidden_states.float().pow(2).mean().backward()
    seen["router_grad"] = str(layer.mlp.gate.weight.grad.dtype)
    seen["finite"] = bool(torch.isfinite(out.hidden_states).all())
    result["bf16"] = seen
    if job.get("hf_dir"):
        result["hf_placements"] = _hf_placements(job["hf_dir"])
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)
    if job.get("ep_runs"):  # tests/test_expert_parallel.py's 2-rank configurations share this launch
        from expert_parallel_worker import run_all

        run_all(env, job["ep_runs"], job["ep_out"])
    from mmtune.train.cli import main

    for argv in job.get("cli_argvs", []):  # each run makes (and ends) its own process group
        rc = main(argv)
        assert rc == 0, f"mmtune train exited {rc}"


def _hf_placements(hf_dir: str) -> dict[str, bool]:
    """The HF reader (train/hf_load.py) into DTensors of every layout the parallelisms make on 2 ranks —
    FSDP, Shard(1), HSDP and expert-parallel-like 2-D meshes, a _StridedShard — each equal to the full
    tensor from from_pretrained. The reader never assumes a layout: DCP derives each rank's region from
    the DTensor's mesh and placements."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from torch.distributed.tensor.placement_types import _StridedShard

    from mmtune.train.hf_load import HFIndex, HFSliceReader

    ref = Glm4vMoeForConditionalGeneration.from_pretrained(hf_dir).state_dict()
    adapter = Glm4vMoeForConditionalGeneration.state_dict_adapter(tiny_config())
    names = ["model.language_model.layers.1.mlp.experts.gate_up_proj", "model.language_model.layers.2.mlp.experts.down_proj",
             "model.language_model.embed_tokens.weight", "model.visual.blocks.0.attn.qkv.weight"]
    layouts = {
        "fsdp": ((2,), [Shard(0)]), "shard1": ((2,), [Shard(1)]),
        "hsdp": ((2, 1), [Replicate(), Shard(0)]), "hsdp_1x2": ((1, 2), [Replicate(), Shard(0)]),
        "ep2_efsdp1": ((2, 1), [Shard(0), Shard(1)]), "ep1_efsdp2": ((1, 2), [Shard(0), Shard(1)]),
        "strided": ((1, 2), [_StridedShard(0, split_factor=2), Shard(0)]),
    }
    out = {}
    for key, (shape, placements) in layouts.items():
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=("a", "b")[: len(shape)])
        these = [n for n in names if ".experts." in n] if key.startswith("ep") else names  # EP: experts only
        sd = {n: distribute_tensor(torch.zeros(ref[n].shape), mesh, placements) for n in these}
        reader = HFSliceReader(HFIndex.build(hf_dir, {n: tuple(ref[n].shape) for n in these}, adapter))
        dcp.load(sd, storage_reader=reader)
        local = sum(sd[n].to_local().numel() * 2 for n in these)  # the file is bf16
        if key == "shard1":  # whole rows are read: the 2-D dense weights are read in full, experts exactly
            full = sum(ref[n].numel() * 2 for n in these)
            read_ok = local < reader.bytes_read < full
        else:  # a rank reads exactly the bytes of its own part
            read_ok = reader.bytes_read == local
        out[key] = all(torch.equal(sd[n].full_tensor(), ref[n]) for n in these) and read_ok
    return out


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(sys.argv[1])
