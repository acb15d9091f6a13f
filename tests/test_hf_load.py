"""--load HF_DIR in one process (train/hf_load.py): hub and merged layouts load exactly like from_pretrained
(MTP and unknown tensors never read); a missing or truncated shard, a missing tensor and a wrong shape
are named before anything is read. The sharded reads (every DTensor layout, only the rank's bytes) and
the 1- and 2-rank training runs from an HF dir are in test_train_dist.py / test_train_cli.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
from mmtune.train.checkpoint import resolve_load_path
from mmtune.train.hf_load import load_hf_weights


def _fresh(hf_dir):
    model = Glm4vMoeForConditionalGeneration(Glm4vMoeForConditionalGeneration.from_pretrained(hf_dir).config)
    return model, Glm4vMoeForConditionalGeneration.state_dict_adapter(model.config)


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert torch.equal(sa[name], sb[name]), name


def test_hub_and_merged_layouts(tiny_hf_dir, tmp_path):
    ref = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir)
    model, adapter = _fresh(tiny_hf_dir)
    read = load_hf_weights(tiny_hf_dir, model, adapter)
    _same(model, ref)
    # every byte read belongs to the model: the MTP layer make-tiny writes is skipped
    stored = sum(p.stat().st_size for p in tiny_hf_dir.glob("*.safetensors"))
    assert read == sum(t.numel() * (4 if "mlp.gate." in n else 2) for n, t in ref.state_dict().items()) < stored
    assert resolve_load_path(tiny_hf_dir).kind == "hf"

    merged = tmp_path / "merged"
    merged.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", merged)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    n = ref.config.text.num_hidden_layers
    sd[f"model.language_model.layers.{n}.eh_proj.weight"] = torch.zeros(3, 3)  # MTP: not read
    sd["some.unknown.tensor"] = torch.zeros(1)
    save_file(sd, merged / "model.safetensors")
    model, adapter = _fresh(tiny_hf_dir)
    load_hf_weights(merged, model, adapter)
    _same(model, ref)


def test_bad_dirs_are_named(tiny_hf_dir, tmp_path):
    d = tmp_path / "hub"
    shutil.copytree(tiny_hf_dir, d)
    model, adapter = _fresh(tiny_hf_dir)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    # truncated shard (an interrupted download): named with the tensor that runs past the end
    data = (d / shards[0]).read_bytes()
    (d / shards[0]).write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=rf"{shards[0]}: tensor .* \(truncated file"):
        load_hf_weights(d, model, adapter)
    (d / shards[0]).unlink()
    with pytest.raises(FileNotFoundError, match=rf"{shards[0]}: shard named in .*index.json"):
        load_hf_weights(d, model, adapter)
    # a tensor the model needs is absent (an expert of a MoE layer, hub layout); one has the wrong shape
    ref = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir).state_dict()
    hub = {n: t.contiguous() for name, x in ref.items() for n, t in adapter.to_hub(name, x)}
    victim = "model.language_model.layers.1.mlp.experts.3.up_proj.weight"
    del hub[victim]
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(tiny_hf_dir / "config.json", one)
    save_file(hub, one / "model.safetensors")
    with pytest.raises(ValueError, match=rf"lack 1 tensor.*{victim}"):
        load_hf_weights(one, model, adapter)
    merged = {k: v.contiguous() for k, v in ref.items()}
    merged["model.language_model.layers.1.mlp.experts.down_proj"] = torch.zeros(4, 128, 32)
    save_file(merged, one / "model.safetensors")
    with pytest.raises(ValueError, match=r"model.safetensors: tensor .*layers.1.mlp.experts.down_proj has shape \(4, 128, 32\)"):
        load_hf_weights(one, model, adapter)
