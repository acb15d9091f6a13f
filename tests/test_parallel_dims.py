"""ParallelDims: the sizes, coordinates and errors of every layout, and (4 gloo ranks) that the meshes it
builds hold exactly the ranks its formulas say."""

from __future__ import annotations

import json
import sys

import pytest

from mmtune.distributed.parallel_dims import ParallelDims
from tests.dist_utils import torchrun


def test_sizes_and_coordinates():
    d = ParallelDims.from_config(16, sharding_size=8, cp=2, ep=4)
    assert (d.dp_replicate, d.dp_shard, d.cp, d.ep) == (2, 4, 2, 4)
    assert (d.dp, d.fsdp, d.efsdp) == (8, 8, 2)
    # rank = (r * dp_shard + s) * cp + c: ranks 6 and 7 are one cp group reading batch 3
    assert [d.dp_rank(r) for r in (6, 7, 8)] == [3, 3, 4]
    assert [d.cp_rank(r) for r in (6, 7)] == [0, 1]
    assert [d.ep_rank(r) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert ParallelDims.from_config(4).dp == 4 and ParallelDims.from_config(4, "auto").dp_replicate == 1
    assert "ep 4 x efsdp 2" in d.describe() and "cp 2" in d.describe()


@pytest.mark.parametrize("kwargs, message", [
    (dict(world_size=4, sharding_size=3), "sharding_size 3 must divide the world size 4"),
    (dict(world_size=6, cp=4), "--context-parallel-size 4 must divide the world size 6"),
    (dict(world_size=8, sharding_size=2, cp=4), "sharding_size 2 must be a multiple of --context-parallel-size 4"),
    (dict(world_size=8, sharding_size=4, ep=8), r"--expert-model-parallel-size 8 must divide .*dp_shard x cp = 4 x 1 = 4"),
    (dict(world_size=6, ep=4), "--expert-model-parallel-size 4 must divide"),
])
def test_bad_layouts_name_the_numbers(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelDims.from_config(**kwargs)


def test_model_checks():
    ParallelDims(4, ep=2).check_model(num_experts=4, num_heads=4)
    with pytest.raises(ValueError, match="must divide the model's n_routed_experts 6"):
        ParallelDims(4, ep=4).check_model(num_experts=6)
    with pytest.raises(ValueError, match="this model is dense"):
        ParallelDims(2, ep=2).check_model(num_experts=None)
    with pytest.raises(ValueError, match="must divide the model's num_attention_heads 6"):
        ParallelDims(4, cp=4).check_model(num_experts=None, num_heads=6)


_MESHES = r'''
import json, sys
import torch.distributed as dist
from mmtune.distributed.env import init_distributed
out = {}
for name, kw in {"cp2_ep2": dict(cp=2, ep=2), "hsdp2_ep2": dict(shard_size=2, ep=2),
                 "hsdp2_cp2": dict(shard_size=2, cp=2), "fsdp": {}}.items():
    env = init_distributed("cpu", **kw)
    d = env.dims
    ranks = lambda m: sorted(m.mesh.flatten().tolist()) if m is not None else None
    dense = env.mesh
    row = {"dense_dims": list(dense.mesh_dim_names), "fsdp": ranks(dense["fsdp"]), "dp_rank": env.dp_rank,
           "cp": ranks(d.cp_mesh), "ep": ranks(d.ep_mesh),
           "efsdp": ranks(d.expert_mesh["efsdp"]) if d.expert_mesh is not None else None}
    if "dp_replicate" in dense.mesh_dim_names:
        row["replicate"] = ranks(dense["dp_replicate"])
    out[name] = row
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, out)
if dist.get_rank() == 0:
    json.dump(gathered, open(sys.argv[1], "w"))
dist.destroy_process_group()
'''


def test_meshes_hold_the_ranks_the_formulas_say(tmp_path):
    script = tmp_path / "meshes.py"
    script.write_text(_MESHES)
    out = tmp_path / "out.json"
    torchrun([str(script), str(out)], nproc=4, timeout=240)
    rows = json.loads(out.read_text())
    for rank, got in enumerate(rows):
        pair = [rank - rank % 2, rank - rank % 2 + 1]  # consecutive ranks form each size-2 inner group
        # cp 2, ep 2 (no replication): dense params sharded over all 4; cp and ep groups are rank pairs
        assert got["cp2_ep2"] == {"dense_dims": ["fsdp"], "fsdp": [0, 1, 2, 3], "dp_rank": rank // 2,
                                  "cp": pair, "ep": pair, "efsdp": [rank % 2, rank % 2 + 2]}
        # HSDP (2 replicas of 2) with ep 2: experts split over the shard group, replicated across replicas
        assert got["hsdp2_ep2"] == {"dense_dims": ["dp_replicate", "fsdp"], "fsdp": pair, "dp_rank": rank,
                                    "cp": None, "ep": pair, "efsdp": [rank], "replicate": [rank % 2, rank % 2 + 2]}
        assert got["hsdp2_cp2"]["fsdp"] == pair and got["hsdp2_cp2"]["cp"] == pair
        assert got["hsdp2_cp2"]["dp_rank"] == rank // 2
        assert got["fsdp"] == {"dense_dims": ["fsdp"], "fsdp": [0, 1, 2, 3], "dp_rank": rank, "cp": None,
                               "ep": None, "efsdp": None}
