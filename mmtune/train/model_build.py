"""Build the training model: meta device -> freeze -> context parallelism + activation checkpointing + FSDP2
(distributed.parallelize) -> to_empty -> weights. Every rank ends up holding only its shard.

Weights come from, in order of preference:
  * a converted weights-only DCP (`--load`, from `mmtune convert hf-to-dcp`): each rank reads its shard;
    nothing is materialised in full anywhere — the path for the 106B model;
  * an HF dir (model.json `init_from_hf_path`): rank 0 reads it in full on the CPU and the shards are
    scattered with `set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)`;
  * nothing: rank 0 initialises a full copy (`init_weights(seed)`) and scatters it the same way.
A training checkpoint (`--load` of a save dir) is loaded later by the trainer, after the optimizer exists;
the model is then only materialised here.

Buffers are not sharded. Rank 0's full copy (HF / init paths) provides every buffer, persistent or not
(rotary inverse frequencies), broadcast to all ranks; the DCP path recomputes non-persistent buffers with
the model's own `init_buffers()` / `init_non_persistent_buffers()` when it has one.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from mmtune.distributed.env import DistEnv
from mmtune.distributed.parallelize import FSDPOptions, materialize, parallelize
from mmtune.train.checkpoint import Checkpointer
from mmtune.train.freeze import FreezeSpec, apply_freeze


def _broadcast_buffers(model: nn.Module, env: DistEnv, source: nn.Module | None) -> None:
    """Copy every buffer from rank 0's full model into each rank's (replicated) buffers."""
    src = dict(source.named_buffers()) if source is not None else {}
    for name, buf in model.named_buffers():
        if env.rank == 0:
            buf.data.copy_(src[name].to(buf.device, buf.dtype))
        if env.distributed:
            dist.broadcast(buf.data, src=0)


def _reset_non_persistent_buffers(model: nn.Module) -> None:
    for hook in ("init_buffers", "init_non_persistent_buffers"):
        if hasattr(model, hook):
            getattr(model, hook)()
            return
    names = [n for m in model.modules() for n in getattr(m, "_non_persistent_buffers_set", ())]
    if names:
        raise ValueError(f"{type(model).__name__} has non-persistent buffers {sorted(names)[:4]} but no "
                         "init_buffers() to recompute them after meta-device init")


def build_model(model_cls, config, env: DistEnv, opts: FSDPOptions, freeze: FreezeSpec, *,
                hf_path: str | Path | None = None, weights_dcp: str | Path | None = None, seed: int = 0,
                full_model_factory=None, load_weights: bool = True) -> nn.Module:
    """The sharded, loaded training model (see the module docstring).

    full_model_factory: () -> full CPU model on rank 0 (default: `model_cls.from_pretrained(hf_path)`
    or `model_cls(config)` + `init_weights(seed)`); for tests with a stand-in model.
    load_weights False: only materialise (a training checkpoint is loaded into it next).
    """
    with torch.device("meta"):
        model = model_cls(config)
    apply_freeze(model, freeze)
    parallelize(model, env.mesh, opts, env.device, cp_mesh=env.dims.cp_mesh, expert_mesh=env.dims.expert_mesh)
    materialize(model, env.device)
    if not load_weights:
        _reset_non_persistent_buffers(model)
        return model
    if weights_dcp is not None:
        Checkpointer.load_weights(weights_dcp, model)
        _reset_non_persistent_buffers(model)
        return model
    full = None
    if env.rank == 0:
        if full_model_factory is not None:
            full = full_model_factory()
        elif hf_path is not None:
            full = model_cls.from_pretrained(hf_path, dtype=torch.float32, device="cpu")
        else:
            full = model_cls(config)
            full.init_weights(seed=seed)
    full_sd = full.state_dict() if full is not None else {}
    if env.distributed:
        opts_sd = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_sd, options=opts_sd)
    else:
        model.load_state_dict(full_sd)
    _broadcast_buffers(model, env, full)
    del full, full_sd
    return model
