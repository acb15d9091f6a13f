"""Process group and device for one process or a torchrun job.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). A plain `mmtune train`
has none of them: it runs as rank 0 of 1 without a process group, and every collective in the trainer
is skipped. With WORLD_SIZE set (even to 1) a process group is created — gloo on CPU; on CUDA nccl for
CUDA tensors with gloo next to it for CPU tensors (`process_group_backend`) — so that the same code path
that runs on many GPUs can be tested on one CPU.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh | None  # data-parallel mesh: 1-D ("dp") or HSDP 2-D ("replicate", "shard"); None alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def make_mesh(device_type: str, world_size: int, shard_size: int | None = None) -> DeviceMesh:
    """The data-parallel mesh: all ranks shard (FSDP) when shard_size is None or the world size; else HSDP —
    parameters sharded within groups of `shard_size` consecutive ranks, replicated across the groups (the
    fsdp2 yaml's sharding_size)."""
    if shard_size is None or shard_size == world_size:
        return init_device_mesh(device_type, (world_size,), mesh_dim_names=("dp",))
    if not 1 <= shard_size <= world_size or world_size % shard_size:
        raise ValueError(f"fsdp2 sharding_size {shard_size} must divide the world size {world_size} "
                         "(or be 'auto' to shard over all ranks)")
    return init_device_mesh(device_type, (world_size // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def process_group_backend(device_type: str, requested: str | None = None) -> str:
    """The process-group backend string. On CUDA: "cuda:nccl,cpu:gloo" — NCCL runs the collectives on GPU
    tensors and gloo those on CPU tensors, which FSDP2's CPU offload (offload_to_cpu) creates: with it the
    gradients are CPU DTensors, and gradient clipping's norm and its full_tensor() all-reduce on the CPU.
    On the CPU: gloo. `requested` "gloo" forces gloo for every tensor; "nccl" is the CUDA default."""
    if requested not in (None, "auto", "nccl", "gloo"):
        raise ValueError(f"--distributed-backend {requested!r}: use auto, nccl or gloo")
    if requested == "gloo" or device_type != "cuda":
        if requested == "nccl":
            raise ValueError("--distributed-backend nccl needs CUDA; use gloo (or auto) on the CPU")
        return "gloo"
    return "cuda:nccl,cpu:gloo"


def init_distributed(device: str | None = None, backend: str | None = None, timeout_s: float = 1800,
                     shard_size: int | None = None) -> DistEnv:
    """Set the device and, under torchrun (WORLD_SIZE set), the process group and the DP mesh.

    device: "cuda" | "cpu" | None (cuda when available). backend: see `process_group_backend`.
    shard_size: HSDP shard-group size (None: shard over every rank); see `make_mesh`.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    device_type = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device cuda requested but torch.cuda.is_available() is False; use --device cpu")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    elif device_type == "cpu":
        dev = torch.device("cpu")
    else:
        raise ValueError(f"unknown device {device_type!r}: use cuda or cpu")
    mesh = None
    if "WORLD_SIZE" in os.environ:
        if not dist.is_initialized():
            backend = process_group_backend(dev.type, backend)
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        mesh = make_mesh(dev.type, world_size, shard_size)
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, mesh=mesh)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
