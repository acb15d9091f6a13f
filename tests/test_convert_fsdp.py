"""A converted DCP loads into the FSDP2-sharded model on 2 gloo ranks and gives the 1-rank logits."""

from __future__ import annotations

import textwrap

import torch
import torch.distributed.checkpoint as dcp

from dist_utils import torchrun
from mmtune.convert import hf_to_dcp

WORKER = textwrap.dedent(
    """
    import sys, torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard
    from mmtune.models.glm4v_moe import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    hf_dir, dcp_dir, inputs, out = sys.argv[1:5]
    dist.init_process_group("gloo")
    cfg = Glm4vMoeConfig.from_pretrained(hf_dir)
    with torch.device("meta"):
        model = Glm4vMoeForConditionalGeneration(cfg)
    for block in [*model.model.visual.blocks, *model.model.language_model.layers]:
        fully_shard(block)
    fully_shard(model)
    model.to_empty(device="cpu")
    sd = model.state_dict()
    assert all(p.device_mesh.size() == 2 for p in model.parameters())  # DTensors sharded over both ranks
    dcp.load(sd, checkpoint_id=dcp_dir)
    model.load_state_dict(sd)
    with torch.no_grad():
        logits = model(**torch.load(inputs, weights_only=True)).logits
    if dist.get_rank() == 0:
        torch.save(logits, out)
    dist.destroy_process_group()
    """
)


def _inputs(cfg):
    g = torch.Generator().manual_seed(0)
    img = [cfg.image_start_token_id, *[cfg.image_token_id] * 4, cfg.image_end_token_id]
    ids = torch.cat([torch.randint(0, 400, (5,), generator=g), torch.tensor(img), torch.randint(0, 400, (7,), generator=g)])
    return {"input_ids": ids[None], "pixel_values": torch.randn(16, cfg.vision.patch_dim, generator=g),
            "image_grid_thw": torch.tensor([[1, 4, 4]])}


def test_dcp_loads_into_fsdp2_model_on_2_ranks(tiny_hf_dir, tmp_path):
    import transformers

    from mmtune.models.glm4v_moe import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration

    d = hf_to_dcp(tiny_hf_dir, tmp_path / "dcp", progress=False)
    cfg = Glm4vMoeConfig.from_pretrained(tiny_hf_dir)
    inputs = _inputs(cfg)
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "worker.py").write_text(WORKER)
    torchrun([str(tmp_path / "worker.py"), str(tiny_hf_dir), str(d), str(tmp_path / "inputs.pt"), str(tmp_path / "logits.pt")])
    logits_2 = torch.load(tmp_path / "logits.pt", weights_only=True)

    # 1 rank: the plain model, the same DCP
    model = Glm4vMoeForConditionalGeneration(cfg)
    sd = model.state_dict()
    dcp.load(sd, checkpoint_id=str(d), no_dist=True)
    model.load_state_dict(sd)
    with torch.no_grad():
        logits_1 = model(**inputs).logits
    torch.testing.assert_close(logits_2, logits_1, rtol=0, atol=1e-6)

    # and the DCP holds what the HF dir holds: transformers' logits from the HF dir agree
    ref = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    mm = (inputs["input_ids"] == cfg.image_token_id).long()
    with torch.no_grad():
        logits_hf = ref(**inputs, mm_token_type_ids=mm).logits
    torch.testing.assert_close(logits_1, logits_hf, rtol=0, atol=1e-4)
