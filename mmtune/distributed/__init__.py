"""Distributed machinery applied to the model from outside: process group + device (env.py),
FSDP2 sharding, mixed precision and activation checkpointing (parallelize.py)."""

from mmtune.distributed.env import DistEnv, init_distributed, shutdown_distributed
from mmtune.distributed.parallelize import FSDPOptions, parallelize

__all__ = ["DistEnv", "init_distributed", "shutdown_distributed", "FSDPOptions", "parallelize"]
