"""The 2-rank LoRA checks, in one torchrun launch (tests/test_lora_train.py starts it):

    torchrun --nproc_per_node 2 tests/lora_worker.py OUT.json

(1) FSDP2 over 2 ranks, LoRA on every Linear and the routed experts, 3 SGD steps with rank 1's batches
text-only: losses and the full adapters (the pytest side runs the same on 1 rank and compares);
(1b) the same with expert parallelism (EP=2: each rank owns 2 of the 4 experts and their adapters);
(2) bf16 mixed precision as on CUDA: frozen base stored in bf16 (routers fp32), adapters fp32 with fp32
gradients, optimizer state for the adapters only. Not collected by pytest.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config
from mmtune.train.freeze import FreezeSpec
from mmtune.train.lora import LoRAConfig

LORA = LoRAConfig(r=4, alpha=8.0)
FREEZE = FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False)


def steps():
    """3 global batches of 4 samples; in each, samples 2 and 3 (rank 1's half) have no image."""
    from test_train_helpers import make_sample

    return [[make_sample(300 + 4 * k + j, with_image=(j < 2)) for j in range(4)] for k in range(3)]


def lora_trainer(env, batches, opts=None, sgd=True):
    from mmtune.distributed import FSDPOptions
    from mmtune.train.model_build import build_model
    from mmtune.train.trainer import LoopSettings, Trainer
    from test_train_helpers import ListLoader, adamw

    torch.manual_seed(0)
    model = build_model(Glm4vMoeForConditionalGeneration, tiny_config(), env, opts or FSDPOptions(), FREEZE,
                        seed=0, lora=LORA)
    opt, sched = adamw(model, sgd=sgd)
    s = LoopSettings(train_iters=3, grad_accum_steps=1, loss_type="per_token_loss")
    return Trainer(s, env, model, opt, sched, ListLoader(batches))


def three_steps(trainer) -> dict:
    """The losses of 3 steps and the trained adapters (full tensors, as lists: JSON for the test)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    for _ in range(3):
        trainer.losses.append(trainer.train_step([trainer._next_batch()]).loss)
    sd = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=True))
    return {"losses": trainer.losses, "adapters": {k: v.tolist() for k, v in sd.items() if "lora_" in k}}


def _worker(out_path: str) -> None:
    from mmtune.distributed import FSDPOptions, init_distributed
    from test_train_helpers import windows_for

    env = init_distributed("cpu")
    result = {}
    batches = [b for step in steps() for b in windows_for(step, 2, env.rank, 2)]
    result["fsdp"] = three_steps(lora_trainer(env, batches))

    # (1b) expert parallelism: the routed experts' adapters split with their experts over the ep ranks
    from dataclasses import replace

    from mmtune.distributed.parallel_dims import ParallelDims

    ep_env = replace(env, dims=ParallelDims.from_config(env.world_size, None, ep=2).build_meshes("cpu"))
    result["ep2"] = three_steps(lora_trainer(ep_env, batches))

    # (2) bf16 compute: what is stored, in which dtype, and what the optimizer holds
    from mmtune.train.optim import build_optimizer

    trainer = lora_trainer(env, batches, FSDPOptions(param_dtype=torch.bfloat16, reduce_dtype=torch.float32), sgd=False)
    model = trainer.model
    trainer.optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    loss = trainer.train_step([trainer._next_batch()]).loss
    dtypes = {}
    for name, p in model.named_parameters():
        kind = "adapter" if "lora_" in name else "router" if ".mlp.gate." in name else "base"
        dtypes.setdefault(kind, set()).add(str(p.to_local().dtype))
    state = trainer.optimizer.state
    names = {id(p): n for n, p in model.named_parameters()}
    result["bf16"] = {
        "dtypes": {k: sorted(v) for k, v in dtypes.items()},
        "optim_params": sorted({("adapter" if "lora_" in names[id(p)] else names[id(p)]) for p in state}),
        "optim_dtypes": sorted({str(s["exp_avg"].dtype) for s in state.values()}),
        "finite": bool(torch.isfinite(torch.tensor(loss))),
    }
    if env.rank == 0:
        with open(out_path, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _worker(sys.argv[1])
    from mmtune.distributed import shutdown_distributed

    shutdown_distributed()  # gloo's threads stop here, not in the interpreter's teardown
