"""HF <-> DCP conversion: bit-exact round trips, training-checkpoint export, CLIs, errors."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

from mmtune.convert import MODEL_PREFIX, dcp_to_hf, hf_to_dcp
from mmtune.convert.dcp_io import model_tensors, read_metadata
from mmtune.weights.hf_files import list_shards
from mmtune.weights.safetensors_io import iter_tensors


def _tensors(hf_dir):
    return {n: t for s in list_shards(hf_dir) for n, t in iter_tensors(s.path, s.entries)}


def _assert_same_tensors(a_dir, b_dir):
    a, b = _tensors(a_dir), _tensors(b_dir)
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert v.dtype == b[k].dtype and v.shape == b[k].shape and torch.equal(v, b[k]), k


@pytest.fixture(scope="module")
def tiny_dcp(tiny_hf_dir, tmp_path_factory):
    # small pieces: the DCP is written in several parts, as a large model is
    return hf_to_dcp(tiny_hf_dir, tmp_path_factory.mktemp("dcp") / "tiny", piece_bytes=300_000, progress=False)


def test_dcp_has_native_names_merged_experts_and_mtp(tiny_dcp, tiny_hf_dir):
    from mmtune.models.glm4v_moe.checkpoint_names import native_shapes
    from mmtune.models.glm4v_moe.config import Glm4vMoeConfig

    cfg = Glm4vMoeConfig.from_pretrained(tiny_hf_dir)
    md = read_metadata(tiny_dcp)
    assert len(list(tiny_dcp.glob("part_*"))) > 1
    stored = {k: tuple(m.size) for k, m in md.state_dict_metadata.items()}
    for name, shape in native_shapes(cfg).items():
        assert stored[name] == shape, name
    assert md.state_dict_metadata["model.language_model.layers.1.mlp.experts.gate_up_proj"].properties.dtype == torch.bfloat16
    assert md.state_dict_metadata["model.language_model.layers.1.mlp.gate.weight"].properties.dtype == torch.float32
    assert "model.language_model.layers.3.eh_proj.weight" in stored  # MTP kept
    assert "model.language_model.layers.3.mlp.experts.0.gate_proj.weight" in stored  # MTP experts untouched
    # values: dcp.load of the merged tensor equals cat(gate, up) of the hub tensors
    hub = _tensors(tiny_hf_dir)
    sd = {"model.language_model.layers.2.mlp.experts.gate_up_proj": torch.empty(stored["model.language_model.layers.2.mlp.experts.gate_up_proj"], dtype=torch.bfloat16)}
    dcp.load(sd, checkpoint_id=str(tiny_dcp), no_dist=True)
    p = "model.language_model.layers.2.mlp.experts.1."
    assert torch.equal(sd["model.language_model.layers.2.mlp.experts.gate_up_proj"][1], torch.cat([hub[p + "gate_proj.weight"], hub[p + "up_proj.weight"]]))


def test_tiny_round_trip_is_bit_exact_and_copies_files(tiny_dcp, tiny_hf_dir, tmp_path):
    out = dcp_to_hf(tiny_hf_dir, tiny_dcp, tmp_path / "out", max_shard_size="600KB", piece_bytes=300_000, progress=False)
    _assert_same_tensors(tiny_hf_dir, out)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "preprocessor_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_hf_dir / name).read_bytes(), name


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    """A checkpoint written by transformers' save_pretrained (bf16 weights, fp32 router kept by
    transformers) plus two tensors it does not know: an MTP-style one and an int64 extra."""
    import transformers

    from mmtune.models.glm4v_moe.config import tiny_config

    hf_cfg = transformers.Glm4vMoeConfig(**tiny_config().to_dict())
    model = transformers.Glm4vMoeForConditionalGeneration._from_config(hf_cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t in model.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    out = tmp_path_factory.mktemp("hf_saved") / "m"
    model.to(torch.bfloat16).save_pretrained(out, max_shard_size="500KB")
    index_file = out / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    extra = {"model.language_model.layers.3.enorm.weight": torch.ones(128, dtype=torch.bfloat16),
             "some.unknown.counter": torch.arange(5, dtype=torch.int64)}
    save_file(extra, out / "extra.safetensors", metadata={"format": "pt"})
    index["weight_map"].update({k: "extra.safetensors" for k in extra})
    index_file.write_text(json.dumps(index))
    return out


def test_transformers_checkpoint_round_trip_and_logits(hf_saved, tmp_path):
    import transformers

    d = hf_to_dcp(hf_saved, tmp_path / "dcp", progress=False)
    assert "some.unknown.counter" in read_metadata(d).state_dict_metadata
    out = dcp_to_hf(hf_saved, d, tmp_path / "out", progress=False)
    _assert_same_tensors(hf_saved, out)
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    logits = []
    for src in (hf_saved, out):
        m, info = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(src, dtype=torch.float32, output_loading_info=True)
        assert not info["missing_keys"]
        logits.append(m(input_ids=ids).logits)
    assert torch.equal(logits[0], logits[1])


def test_training_checkpoint_export(tiny_dcp, tiny_hf_dir, tmp_path):
    """A training save dir: model under "model." (fp32, as a trainer holds it), optimizer under "optim.",
    no MTP layer; dcp-to-hf picks the latest iteration, exports only the model, keeps H's MTP tensors."""
    md = read_metadata(tiny_dcp)
    known = {n: m for n, (_, m) in model_tensors(md).items() if not n.startswith("model.language_model.layers.3.")}
    native = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in known.items()}
    dcp.load(native, checkpoint_id=str(tiny_dcp), no_dist=True)
    save = tmp_path / "save"
    state = {"model": {k: v.float() for k, v in native.items()},
             "optim": {"state": {"lm_head.weight": {"exp_avg": torch.ones(3)}}}}
    dcp.save(state, checkpoint_id=str(save / "iter_0000010"), no_dist=True)
    (save / "latest_checkpointed_iteration.txt").write_text("10\n")
    assert any(k.startswith(MODEL_PREFIX + "lm_head") for k in read_metadata(save / "iter_0000010").state_dict_metadata)

    out = dcp_to_hf(tiny_hf_dir, save, tmp_path / "out", dtype="hf", progress=False)
    _assert_same_tensors(tiny_hf_dir, out)  # bf16 -> fp32 -> bf16 is exact; MTP copied from H
    kept = dcp_to_hf(tiny_hf_dir, save / "iter_0000010", tmp_path / "kept", progress=False)
    assert load_file(kept / "model.safetensors")["lm_head.weight"].dtype == torch.float32


def test_cli_spellings(tiny_hf_dir, tmp_path, capsys):
    from mmtune.cli import main
    from mmtune.convert.cli import mm_convert_main

    assert mm_convert_main(["ExpertMergeDcpConverter", "hf_to_dcp", "--hf_dir", str(tiny_hf_dir),
                            "--save_dir", str(tmp_path / "d"), "--no-progress"]) == 0
    assert mm_convert_main(["ExpertMergeDcpConverter", "dcp_to_hf", "--hf_dir", str(tiny_hf_dir), "--dcp_dir",
                            str(tmp_path / "d"), "--save_dir", str(tmp_path / "o"), "--no-progress"]) == 0
    _assert_same_tensors(tiny_hf_dir, tmp_path / "o")
    # non-empty save dir refused, then replaced with --force
    args = ["convert", "dcp-to-hf", "--hf-dir", str(tiny_hf_dir), "--dcp-dir", str(tmp_path / "d"),
            "--save-dir", str(tmp_path / "o"), "--max-shard-size", "1MB", "--no-progress"]
    assert main(args) == 1
    assert "not empty" in capsys.readouterr().err
    stale = tmp_path / ".o.tmp-4194303"  # a killed run's leftovers (no such pid): cleaned up
    stale.mkdir()
    assert main([*args, "--force"]) == 0
    assert not stale.exists()
    _assert_same_tensors(tiny_hf_dir, tmp_path / "o")
    assert not list(tmp_path.glob(".*tmp*"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_errors_name_file_and_tensor(tiny_hf_dir, tmp_path):
    index = json.loads((tiny_hf_dir / "model.safetensors.index.json").read_text())
    # truncated shard
    h = _copy(tiny_hf_dir, tmp_path / "trunc")
    shard = h / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: tensor \S+: data ends .*truncated"):
        hf_to_dcp(h, tmp_path / "x", progress=False)
    # corrupt header
    shard.write_bytes(b"\xff" * 64)
    with pytest.raises(ValueError, match=r"model-00002-of-00003\.safetensors: corrupt"):
        hf_to_dcp(h, tmp_path / "x", progress=False)
    # missing shard
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00003\.safetensors: shard named in .* tensor"):
        hf_to_dcp(h, tmp_path / "x", progress=False)
    # config.json disagrees with the tensors: the error comes mid-stream, nothing is left behind
    h = _copy(tiny_hf_dir, tmp_path / "cfg")
    cfg = json.loads((h / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] = 32
    (h / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"safetensors: tensor model\.language_model\.layers\.1\.mlp\.experts\.\d\.\w+_proj\.weight: shape"):
        hf_to_dcp(h, tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.tmp*"))
    # a tensor the index names is not in its file
    h = _copy(tiny_hf_dir, tmp_path / "idx")
    name = next(k for k, f in index["weight_map"].items() if f != "model-00001-of-00003.safetensors")
    index["weight_map"][name] = "model-00001-of-00003.safetensors"
    (h / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"00001-of-00003\.safetensors: tensor {re.escape(name)} is listed in .* not stored"):
        hf_to_dcp(h, tmp_path / "x", progress=False)
    # dcp-to-hf: not a checkpoint; a checkpoint that disagrees with config.json
    with pytest.raises(FileNotFoundError, match="not a DCP checkpoint"):
        dcp_to_hf(tiny_hf_dir, tmp_path, tmp_path / "y", progress=False)
    d = hf_to_dcp(tiny_hf_dir, tmp_path / "d", progress=False)
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.gate_up_proj has shape .* expects"):
        dcp_to_hf(tmp_path / "cfg", d, tmp_path / "y", progress=False)
    save = tmp_path / "save"
    save.mkdir()
    (save / "latest_checkpointed_iteration.txt").write_text("20")
    with pytest.raises(FileNotFoundError, match=r"latest_checkpointed_iteration\.txt names iteration 20 but .*iter_0000020"):
        dcp_to_hf(tiny_hf_dir, save, tmp_path / "y", progress=False)
    # the output may not be the input
    with pytest.raises(ValueError, match="must not be"):
        hf_to_dcp(tiny_hf_dir, tiny_hf_dir / "sub", force=True, progress=False)
