"""from_pretrained: hub layout (per-expert, sharded + index) and merged layout, dtypes, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config
from test_model import hf_kwargs, hf_model, image_sample, make_pair


@pytest.fixture(scope="module")
def hub_dir(tmp_path_factory):
    """transformers' own save_pretrained of a tiny model: hub layout (one tensor per expert), sharded."""
    cfg = tiny_config()
    _, hf = make_pair(cfg, seed=5)
    out = tmp_path_factory.mktemp("hub") / "model"
    hf.save_pretrained(out, max_shard_size="300KB")
    return out


def test_hub_layout_loads_and_equals_transformers(hub_dir):
    files = json.loads((hub_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert any(".mlp.experts.0.gate_proj.weight" in k for k in files), "expected hub (per-expert) names"
    assert len(set(files.values())) >= 2
    ours = Glm4vMoeForConditionalGeneration.from_pretrained(hub_dir)
    from transformers import Glm4vMoeForConditionalGeneration as HF

    hf = HF.from_pretrained(hub_dir, dtype=torch.float32, attn_implementation="eager").eval()
    cfg = ours.config
    ids, px, grid = image_sample(cfg, [(1, 4, 6)], text_len=10)
    with torch.no_grad():
        diff = (ours(ids, pixel_values=px, image_grid_thw=grid).logits - hf(**hf_kwargs(cfg, ids, px, grid)).logits)
    assert diff.abs().max() <= 1e-4


def test_merged_layout_with_mtp_and_unknown_keys(tmp_path):
    cfg = tiny_config()
    ref, _ = make_pair(cfg, seed=6)
    cfg.save_pretrained(tmp_path)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    n = cfg.text.num_hidden_layers
    sd[f"model.language_model.layers.{n}.eh_proj.weight"] = torch.zeros(3, 3)  # MTP: ignored
    sd[f"model.language_model.layers.{n}.mlp.experts.0.up_proj.weight"] = torch.zeros(2, 2)  # MTP expert: ignored
    sd["some.unknown.tensor"] = torch.zeros(1)  # ignored
    save_file(sd, tmp_path / "model.safetensors")
    ours = Glm4vMoeForConditionalGeneration.from_pretrained(tmp_path)
    for name, t in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[name], t), name


def test_bf16_load_keeps_router_fp32(hub_dir):
    model = Glm4vMoeForConditionalGeneration.from_pretrained(hub_dir, dtype=torch.bfloat16)
    gate = model.model.language_model.layers[1].mlp.gate
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.language_model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    ids, _, _ = image_sample(model.config, [], text_len=8)
    with torch.no_grad():
        out = model(ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
    assert out.router_logits[0].dtype == torch.float32


def test_make_tiny_dir_loads_like_transformers(tiny_hf_dir):
    from transformers import Glm4vMoeForConditionalGeneration as HF

    ours = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir)
    hf = HF.from_pretrained(tiny_hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    ids, px, grid = image_sample(ours.config, [(1, 4, 4)], text_len=10)
    with torch.no_grad():
        diff = ours(ids, pixel_values=px, image_grid_thw=grid).logits - hf(**hf_kwargs(ours.config, ids, px, grid)).logits
    assert diff.abs().max() <= 1e-4


def test_missing_shard_is_named_with_its_index(hub_dir, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(hub_dir, d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (d / victim).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{victim}.*model.safetensors.index.json"):
        Glm4vMoeForConditionalGeneration.from_pretrained(d)


def test_wrong_shape_and_missing_tensors_are_named(tmp_path):
    cfg = tiny_config()
    cfg.save_pretrained(tmp_path)
    ref = Glm4vMoeForConditionalGeneration(cfg)
    ref.init_weights(0)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    sd["model.language_model.layers.0.self_attn.q_proj.weight"] = torch.zeros(5, 7)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors.*q_proj.weight.*\(5, 7\).*\(128, 128\)"):
        Glm4vMoeForConditionalGeneration.from_pretrained(tmp_path)

    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    del sd["model.language_model.norm.weight"], sd["model.language_model.layers.2.mlp.experts.down_proj"]
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 2 tensor.*layers.2.mlp.experts.down_proj.*norm.weight"):
        Glm4vMoeForConditionalGeneration.from_pretrained(tmp_path)

    with pytest.raises(FileNotFoundError, match="no such model dir"):
        Glm4vMoeForConditionalGeneration.from_pretrained(tmp_path / "nope")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        Glm4vMoeForConditionalGeneration.from_pretrained(tmp_path)
