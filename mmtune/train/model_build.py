"""Build the training model: meta device -> freeze (-> LoRA adapters) -> frozen weights to the compute
dtype -> context parallelism + activation checkpointing + FSDP2 (distributed.parallelize) -> to_empty ->
weights (-> adapter init). Every rank ends up holding only its shard.

With LoRA (train/lora.py) every base weight is frozen and only the adapters train; frozen weights are stored
in the compute dtype (FSDP's param_dtype, e.g. bf16) instead of fp32 — they have no gradient or optimizer
state, so nothing needs their fp32 copy — except the routers, which compute in fp32. The adapters stay fp32.

Weights come from, in order of preference:
  * a converted weights-only DCP (`--load`, from `mmtune convert hf-to-dcp`): each rank reads its shard;
  * an HF dir (`--load HF_DIR`, or model.json `init_from_hf_path`): each rank reads only its slices of the
    safetensors files (plain reads, no mmap), experts merged on the fly (train/hf_load.py) — no conversion step, and
    nothing is materialised in full anywhere: the path for the 106B model;
  * nothing: rank 0 initialises a full copy (`init_weights(seed)`) and scatters it with
    `set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)` (tests, tiny models).
A training checkpoint (`--load` of a save dir) is loaded later by the trainer, after the optimizer exists;
the model is then only materialised here.

Buffers are not sharded. On the init path rank 0's full copy provides every buffer, persistent or not
(rotary inverse frequencies), broadcast to all ranks; the DCP and HF paths load the persistent ones and
recompute the non-persistent ones with the model's own `init_buffers()` / `init_non_persistent_buffers()`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from mmtune.distributed.env import DistEnv
from mmtune.distributed.parallelize import FSDPOptions, materialize, parallelize, store_frozen_in
from mmtune.train.checkpoint import Checkpointer
from mmtune.train.hf_load import load_hf_weights
from mmtune.train.freeze import FreezeSpec, apply_freeze
from mmtune.train.lora import LoRAConfig, LoRAInfo, apply_lora, init_adapters


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
                full_model_factory=None, load_weights: bool = True, lora: LoRAConfig | None = None) -> nn.Module:
    """The sharded, loaded training model (see the module docstring).

    hf_path: an HF dir read slice by slice through `model_cls.state_dict_adapter(config)`.
    full_model_factory: () -> full CPU model on rank 0 (default: `model_cls(config)` + `init_weights(seed)`),
    used when neither weights_dcp nor hf_path is given; for tests with a stand-in model.
    load_weights False: only materialise (a training checkpoint is loaded into it next).
    lora: put LoRA adapters on the model (the modules the freeze flags leave trainable); the base weights
    load as without it and the adapters get their seeded init (train/lora.lora_modules lists them).
    """
    with torch.device("meta"):
        model = model_cls(config)
    apply_freeze(model, freeze)
    info: LoRAInfo | None = apply_lora(model, lora, freeze) if lora is not None else None
    store_frozen_in(model, opts.param_dtype)
    parallelize(model, env.mesh, opts, env.device, cp_mesh=env.dims.cp_mesh,
                expert_mesh=env.dims.expert_mesh)
    materialize(model, env.device, cpu_offload=opts.cpu_offload)
    if not load_weights:
        _reset_non_persistent_buffers(model)
        return model
    if weights_dcp is not None:
        Checkpointer.load_weights(weights_dcp, model)
        _reset_non_persistent_buffers(model)
        if info is not None:
            init_adapters(model, seed)
        return model
    if hf_path is not None:
        load_hf_weights(hf_path, model, model_cls.state_dict_adapter(config), progress=env.is_main)
        _reset_non_persistent_buffers(model)
        if info is not None:
            init_adapters(model, seed)
        return model
    full = None
    if env.rank == 0:
        if full_model_factory is not None:
            full = full_model_factory()
        else:
            full = model_cls(config)
            full.init_weights(seed=seed)
    full_sd = full.state_dict() if full is not None else {}
    strict = info is None  # a base state dict has no adapters: they are initialised below
    if env.distributed:
        opts_sd = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=strict)
        set_model_state_dict(model, full_sd, options=opts_sd)
    else:
        result = model.load_state_dict(full_sd, strict=strict)
        assert not result.unexpected_keys and all("lora_" in k for k in result.missing_keys), result
    _broadcast_buffers(model, env, full)
    del full, full_sd
    if info is not None:
        init_adapters(model, seed)
    return model
