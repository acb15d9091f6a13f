"""`mmtune make-tiny`: an HF dir that transformers loads, hub layout, deterministic."""

from __future__ import annotations

import json

import torch

from mmtune.weights.safetensors_io import read_header
from mmtune.tiny import make_tiny


def test_loads_in_transformers_without_missing_keys(tiny_hf_dir):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(tiny_hf_dir)
    assert cfg.model_type == "glm4v_moe"
    model, info = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(
        tiny_hf_dir, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    # the MTP layer is the only thing transformers does not use
    n = cfg.text_config.num_hidden_layers
    assert all(k.startswith(f"model.language_model.layers.{n}.") for k in info["unexpected_keys"])
    assert model.model.language_model.layers[1].mlp.experts.gate_up_proj.abs().sum() > 0


def test_hub_layout_shards_dtypes_and_mtp(tiny_hf_dir):
    index = json.loads((tiny_hf_dir / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    entries = {e.name: e for f in files for e in read_header(tiny_hf_dir / f)}
    assert entries.keys() == index["weight_map"].keys()
    assert index["metadata"]["total_size"] == sum(e.nbytes for e in entries.values())
    assert "model.language_model.layers.1.mlp.experts.0.gate_proj.weight" in entries
    assert not any(k.endswith("experts.gate_up_proj") for k in entries)
    assert entries["model.language_model.layers.1.mlp.gate.weight"].dtype == torch.float32
    assert entries["model.language_model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert entries["lm_head.weight"].dtype == torch.bfloat16
    assert "model.language_model.layers.3.eh_proj.weight" in entries
    assert "model.language_model.layers.3.mlp.experts.3.down_proj.weight" in entries


def test_tokenizer_processor_and_generation_config(tiny_hf_dir):
    import transformers
    from PIL import Image

    cfg = json.loads((tiny_hf_dir / "config.json").read_text())
    tok = transformers.AutoTokenizer.from_pretrained(tiny_hf_dir)
    assert tok.convert_tokens_to_ids("<|image|>") == cfg["image_token_id"]
    proc = transformers.AutoImageProcessor.from_pretrained(tiny_hf_dir)
    out = proc(images=[Image.new("RGB", (56, 56))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 4, 4]]  # 56x56 stays 56x56: 4 LLM tokens
    gen = json.loads((tiny_hf_dir / "generation_config.json").read_text())
    assert gen["eos_token_id"] == cfg["text_config"]["eos_token_id"]


def test_deterministic_for_a_seed(tmp_path, tiny_hf_dir):
    again = make_tiny(tmp_path / "again", seed=0)
    other = make_tiny(tmp_path / "other", seed=1)
    names = sorted(p.name for p in tiny_hf_dir.iterdir())
    assert names == sorted(p.name for p in again.iterdir())
    for name in names:
        assert (tiny_hf_dir / name).read_bytes() == (again / name).read_bytes(), name
    shard = "model-00001-of-00003.safetensors"
    assert (tiny_hf_dir / shard).read_bytes() != (other / shard).read_bytes()
    assert not list(tmp_path.glob(".*tmp*"))


def test_cli(tmp_path, capsys):
    from mmtune.cli import main

    assert main(["make-tiny", "--out", str(tmp_path / "t"), "--seed", "3"]) == 0
    assert (tmp_path / "t" / "model.safetensors.index.json").is_file()
    assert "wrote" in capsys.readouterr().out
