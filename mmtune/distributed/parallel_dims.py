"""The parallel layout of a training job. One object owns it: `ParallelDims` says how many ranks each kind
of parallelism uses, validates the numbers once (errors name them), and builds every device mesh. The model,
the loader, the loss and the checkpointer ask it; nobody else computes a rank or a group.

    world = dp_replicate x dp_shard x cp            (no tensor or pipeline parallelism)

- dp_replicate x dp_shard ranks read different batches (the data-parallel size `dp`); the `cp` ranks of one
  context-parallel group read the same batch and each keeps 1/cp of its tokens.
- Dense parameters are FSDP-sharded over `fsdp = dp_shard x cp` ranks and replicated over `dp_replicate`
  (HSDP, the fsdp2 yaml's `sharding_size` = fsdp; plain FSDP when dp_replicate is 1).
- Routed experts (ep > 1) are split over `ep` ranks taken from the fsdp ranks (EP reuses data/context ranks,
  as torchtitan lays it out): each ep rank owns E/ep whole experts, FSDP-sharded over the remaining
  `efsdp = fsdp / ep` ranks and replicated over dp_replicate.

Rank order is row-major over (dp_replicate, dp_shard, cp): rank = (r * dp_shard + s) * cp + c. The cp group
and the ep group are therefore consecutive ranks (one node's fast links), replicas lie furthest apart.

Meshes (each unflattened from one world mesh, so DTensors on any of them share a root and compose):
    dense    ("fsdp",) or ("dp_replicate", "fsdp")     FSDP2 of every non-expert parameter
    experts  ("dp_replicate", "efsdp", "ep")           expert parameters (ep > 1 only)
    data     ("dp", "cp")                              the cp group; the dp coordinate picks the batch
The loss reduces over every rank (each holds different tokens of the global batch): the default group.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclass
class ParallelDims:
    world_size: int
    dp_replicate: int = 1
    cp: int = 1
    ep: int = 1
    meshes: dict[str, DeviceMesh] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in ("world_size", "dp_replicate", "cp", "ep"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"parallel sizes must be positive integers; {name} is {value!r}")
        w, rep, cp, ep = self.world_size, self.dp_replicate, self.cp, self.ep
        if w % cp:
            raise ValueError(f"--context-parallel-size {cp} must divide the world size {w}")
        if w % (rep * cp):
            raise ValueError(f"the FSDP shard group (fsdp2 sharding_size {w // rep}) must be a multiple of "
                             f"--context-parallel-size {cp} and divide the world size {w}")
        if self.fsdp % ep:
            raise ValueError(f"--expert-model-parallel-size {ep} must divide the ranks that shard one replica "
                             f"(dp_shard x cp = {self.dp_shard} x {cp} = {self.fsdp}; world size {w}, "
                             f"{rep} replica(s))")

    @classmethod
    def from_config(cls, world_size: int, sharding_size: int | str | None = None, cp: int = 1,
                    ep: int = 1) -> "ParallelDims":
        """From the launch: the fsdp2 yaml's `sharding_size` ("auto"/None = shard over every rank; n = HSDP
        with shard groups of n ranks, which include the cp ranks) and the cp / ep flags."""
        if sharding_size in (None, "auto") or int(sharding_size) == world_size:
            return cls(world_size, 1, cp, ep)
        n = int(sharding_size)
        if not 1 <= n <= world_size or world_size % n:
            raise ValueError(f"fsdp2 sharding_size {n} must divide the world size {world_size} "
                             "(or be 'auto' to shard over all ranks)")
        if n % cp:
            raise ValueError(f"fsdp2 sharding_size {n} must be a multiple of --context-parallel-size {cp} "
                             "(a context-parallel group shards parameters together)")
        return cls(world_size, world_size // n, cp, ep)

    # ---- sizes -----------------------------------------------------------------------------------
    @property
    def dp_shard(self) -> int:
        return self.world_size // (self.dp_replicate * self.cp)

    @property
    def dp(self) -> int:
        """Data-parallel size: how many different batches one step reads (global batch = mbs x dp x accum)."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp(self) -> int:
        """Ranks one dense parameter is sharded over (within a replica)."""
        return self.dp_shard * self.cp

    @property
    def efsdp(self) -> int:
        """Ranks one expert's parameters are sharded over (within a replica and an ep group)."""
        return self.fsdp // self.ep

    # ---- coordinates -------------------------------------------------------------------------------
    def dp_rank(self, rank: int) -> int:
        """Which batch `rank` reads (0 .. dp-1): the cp ranks of a group read the same one."""
        return rank // self.cp

    def cp_rank(self, rank: int) -> int:
        return rank % self.cp

    def ep_rank(self, rank: int) -> int:
        return rank % self.fsdp % self.ep

    def check_model(self, *, num_experts: int | None, num_heads: int | None = None) -> None:
        """Model-dependent checks: ep divides the routed experts (a dense model has none); cp divides the
        query heads (Ulysses gives each cp rank heads/cp of them)."""
        if self.ep > 1:
            if not num_experts:
                raise ValueError(f"--expert-model-parallel-size {self.ep} needs a model with routed experts; "
                                 "this model is dense (set it to 1)")
            if num_experts % self.ep:
                raise ValueError(f"--expert-model-parallel-size {self.ep} must divide the model's "
                                 f"n_routed_experts {num_experts}")
        if self.cp > 1 and num_heads is not None and num_heads % self.cp:
            raise ValueError(f"--context-parallel-size {self.cp} must divide the model's num_attention_heads "
                             f"{num_heads} (Ulysses splits the heads across the group)")

    def describe(self) -> str:
        parts = [f"dp {self.dp}" + (f" ({self.dp_replicate} replicas x {self.dp_shard})" if self.dp_replicate > 1 else "")]
        if self.cp > 1:
            parts.append(f"cp {self.cp}")
        parts.append(f"fsdp {self.fsdp}")
        if self.ep > 1:
            parts.append(f"ep {self.ep} x efsdp {self.efsdp}")
        return ", ".join(parts)

    # ---- meshes ------------------------------------------------------------------------------------
    def build_meshes(self, device_type: str) -> "ParallelDims":
        """Create every mesh (collective: every rank calls it once, after the process group exists)."""
        world = init_device_mesh(device_type, (self.world_size,), mesh_dim_names=("world",))
        if self.dp_replicate > 1:
            dense = world._unflatten(0, (self.dp_replicate, self.fsdp), ("dp_replicate", "fsdp"))
        else:
            dense = world._unflatten(0, (self.fsdp,), ("fsdp",))
        self.meshes = {"world": world, "dense": dense}
        if self.cp > 1:
            self.meshes["data"] = world._unflatten(0, (self.dp, self.cp), ("dp", "cp"))
        if self.ep > 1:
            self.meshes["experts"] = world._unflatten(
                0, (self.dp_replicate, self.efsdp, self.ep), ("dp_replicate", "efsdp", "ep"))
        return self

    @property
    def dense_mesh(self) -> DeviceMesh | None:
        return self.meshes.get("dense")

    @property
    def expert_mesh(self) -> DeviceMesh | None:
        return self.meshes.get("experts")

    @property
    def cp_mesh(self) -> DeviceMesh | None:
        mesh = self.meshes.get("data")
        return mesh["cp"] if mesh is not None else None

    @property
    def dp_mesh(self) -> DeviceMesh | None:
        """The ranks that read different batches, one per cp group (the loss's window counts are summed over
        them); None when cp is 1: then every rank reads its own batch (the default group)."""
        mesh = self.meshes.get("data")
        return mesh["dp"] if mesh is not None else None

    @property
    def ep_mesh(self) -> DeviceMesh | None:
        mesh = self.meshes.get("experts")
        return mesh["ep"] if mesh is not None else None
