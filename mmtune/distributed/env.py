"""Process group and device for one process or a torchrun job.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK (and MASTER_ADDR / MASTER_PORT). A plain `mmtune train`
has none of them: it runs as rank 0 of 1 without a process group, and every collective in the trainer
is skipped. With WORLD_SIZE set (even to 1) a process group is created — gloo on CPU; on CUDA nccl for
CUDA tensors with gloo next to it for CPU tensors (`process_group_backend`) — so that the same code path
that runs on many GPUs can be tested on one CPU. The parallel layout and its meshes belong to
`ParallelDims` (parallel_dims.py); `DistEnv` carries it.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from mmtune.distributed.parallel_dims import ParallelDims

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dims: ParallelDims | None = None  # the parallel layout; its meshes are built when a process group exists

    def __post_init__(self):
        if self.dims is None:
            self.dims = ParallelDims(self.world_size)

    @property
    def mesh(self) -> DeviceMesh | None:
        """The FSDP mesh of dense parameters: ("fsdp",) or HSDP ("dp_replicate", "fsdp"); None alone."""
        return self.dims.dense_mesh

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_rank(self) -> int:
        """Which batch this rank reads (the ranks of one context-parallel group read the same one)."""
        return self.dims.dp_rank(self.rank)

    @property
    def dp_size(self) -> int:
        return self.dims.dp

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


FLIGHT_RECORDER_ENTRIES = "2000"


def apply_timeout_everywhere(timeout_s: float) -> None:
    """Make `timeout_s` the timeout of every process group created from now on, not only the default one:
    torch gives a group created without an explicit timeout (each DeviceMesh dimension, `new_group`) its
    built-in default (30 min gloo, 10 min nccl) instead of the default group's."""
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(seconds=timeout_s)
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def enable_flight_recorder() -> None:
    """Record every collective of every process group (gloo and NCCL) in torch's flight recorder unless the
    user chose a size: a failure can then name the collective (distributed/errors.py) and NCCL dumps the
    record on a timeout. Read when the first process group is created."""
    if "TORCH_FR_BUFFER_SIZE" not in os.environ and "TORCH_NCCL_TRACE_BUFFER_SIZE" not in os.environ:
        os.environ["TORCH_FR_BUFFER_SIZE"] = FLIGHT_RECORDER_ENTRIES


_INITS = [0]  # process groups this process has made (tests run `mmtune train` twice in one worker)


def _store_for_this_attempt(timeout_s: float):
    """torchrun's agent keeps ONE key-value store for all restarts of a job; every process group publishes
    its ranks' addresses in it, so a restarted worker can read the previous attempt's (dead) addresses and
    fail to connect (pytorch issue 135712) — with new groups (a 2-D mesh, the async-save group) almost
    surely. On one node the restart count is the same for every worker, so scoping the store by it (and by
    how many times this process initialised) isolates the attempts. Across nodes each agent counts its own
    restarts; there, torchrun --rdzv-backend c10d with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every
    attempt a fresh store (examples/glm4.5v/env.sh) and nothing is done here. None: let torch rendezvous."""
    _INITS[0] += 1
    one_node = os.environ.get("LOCAL_WORLD_SIZE") == os.environ.get("WORLD_SIZE")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if not one_node:
        if _env_int("TORCHELASTIC_MAX_RESTARTS", 0) > 0 and os.environ.get("RANK") == "0":
            log.warning("torchrun --max-restarts across nodes with a store shared by all attempts: a restart can "
                        "fail to connect (pytorch issue 135712); launch with --rdzv-backend c10d and "
                        "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (examples/glm4.5v/env.sh)")
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=datetime.timedelta(seconds=timeout_s)))
    prefix = f"mmtune/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/init_{_INITS[0]}"
    return dist.PrefixStore(prefix, store)


def init_distributed(device: str | None = None, backend: str | None = None, timeout_s: float = 1800,
                     shard_size: int | str | None = None, cp: int = 1, ep: int = 1) -> DistEnv:
    """Set the device and, under torchrun (WORLD_SIZE set), the process group and every mesh.

    device: "cuda" | "cpu" | None (cuda when available). backend: see `process_group_backend`.
    shard_size: the fsdp2 yaml's sharding_size (None/"auto": shard over every rank; n: HSDP with shard groups
    of n ranks); cp, ep: context- and expert-parallel sizes. See `ParallelDims`.
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
    dims = ParallelDims.from_config(world_size, shard_size, cp=cp, ep=ep)
    if "WORLD_SIZE" in os.environ:
        apply_timeout_everywhere(timeout_s)  # --distributed-timeout-minutes for the mesh's groups too
        if not dist.is_initialized():
            enable_flight_recorder()
            backend = process_group_backend(dev.type, backend)
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            store = _store_for_this_attempt(timeout_s)
            if store is not None:
                kwargs.update(store=store, rank=rank, world_size=world_size)
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
        dims.build_meshes(dev.type)
    elif cp > 1 or ep > 1:
        raise ValueError("context/expert parallelism needs several processes: launch with torchrun")
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, dims=dims)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
