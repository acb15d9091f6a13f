"""LoRA exports of a LoRA checkpoint (adapters on attention, the dense MLP, the shared experts, the routed
experts and the vision tower, all non-zero): `mmtune convert dcp-to-hf` merges them into the base HF dir
(== the LoRA model's logits in fp32), and `--adapter-only` writes a PEFT dir that transformers + PEFT load
onto transformers' own model (== the merged model's logits)."""

from __future__ import annotations

import json

import pytest
import torch

from mmtune.convert.cli import main as convert_main
from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
from mmtune.train.checkpoint import Checkpointer
from mmtune.train.freeze import FreezeSpec
from mmtune.train.lora import LoRAConfig, apply_lora, lora_modules, metadata
from test_model import hf_kwargs, image_sample

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "shared_experts", "experts",
           "qkv", "proj")


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory, tiny_hf_dir):
    """A tiny LoRA model on the make-tiny weights with random (non-zero) adapters, saved as a training checkpoint."""
    root = tmp_path_factory.mktemp("lora_export")
    model = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    cfg = LoRAConfig(r=4, alpha=8.0, targets=TARGETS)
    apply_lora(model, cfg, FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save = root / "save"
    Checkpointer(save, lora=metadata(cfg, lora_modules(model), {"hf": str(tiny_hf_dir)})).save(3, model)
    return {"model": model, "save": save, "root": root}


def _sample(model):
    ids, pix, grid = image_sample(model.config, [(1, 4, 4), (1, 4, 8)], 12, seed=5)
    return ids, pix, grid


def test_checkpoint_holds_only_the_adapters(lora_ckpt):
    from mmtune.train.checkpoint import checkpoint_keys

    keys = checkpoint_keys(lora_ckpt["save"] / "iter_0000003")
    model_keys = {k for k in keys if k.startswith("model.")}
    adapters = {n for n, _ in lora_ckpt["model"].named_parameters() if "lora_" in n}
    buffers = {n for n, _ in lora_ckpt["model"].named_buffers()}  # the routers' score-correction biases
    assert model_keys == {"model." + n for n in adapters | buffers} and "lora" in keys
    kinds = set(lora_modules(lora_ckpt["model"]).values())
    assert kinds == {"linear", "experts"}
    names = " ".join(adapters)
    for part in ("self_attn.q_proj", "layers.0.mlp.gate_proj", "shared_experts.down_proj", "experts.gate_up_proj",
                 "experts.down_proj", "visual.blocks.0.attn.qkv", "visual.blocks.1.mlp.up_proj", "merger.proj"):
        assert part in names, part


def test_merged_export_equals_the_lora_model(lora_ckpt, tiny_hf_dir):
    out = lora_ckpt["root"] / "merged"
    assert convert_main(["dcp-to-hf", "--hf-dir", str(tiny_hf_dir), "--dcp-dir", str(lora_ckpt["save"]),
                         "--save-dir", str(out), "--no-progress"]) == 0
    model = lora_ckpt["model"]
    merged = Glm4vMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32).eval()
    ids, pix, grid = _sample(model)
    with torch.no_grad():
        want, got = model(ids, pix, grid).logits, merged(ids, pix, grid).logits
    base = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (base(ids, pix, grid).logits - want).abs().max() > 1e-2  # the adapters matter
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the same shard files as the base, tokenizer etc. copied; adapted tensors fp32, the rest as in the base
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in tiny_hf_dir.glob("*.safetensors"))
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors.index.json").is_file()
    from mmtune.weights.safetensors_io import read_header

    dtypes = {e.name: e.dtype for f in out.glob("*.safetensors") for e in read_header(f)}
    assert dtypes["model.language_model.layers.1.mlp.experts.3.up_proj.weight"] == torch.float32
    assert dtypes["model.language_model.layers.1.input_layernorm.weight"] == torch.bfloat16
    # --dtype hf: back to the base's dtypes
    out_hf = lora_ckpt["root"] / "merged_hf"
    assert convert_main(["dcp-to-hf", "--hf-dir", str(tiny_hf_dir), "--dcp-dir", str(lora_ckpt["save"]),
                         "--save-dir", str(out_hf), "--no-progress", "--dtype", "hf"]) == 0
    dtypes = {e.name: e.dtype for f in out_hf.glob("*.safetensors") for e in read_header(f)}
    assert dtypes["model.language_model.layers.1.mlp.experts.3.up_proj.weight"] == torch.bfloat16
    lora_ckpt["merged"] = out


def test_peft_adapter_loads_in_transformers_with_the_merged_logits(lora_ckpt, tiny_hf_dir):
    pytest.importorskip("peft")
    from transformers import Glm4vMoeForConditionalGeneration as HF

    out = lora_ckpt["root"] / "peft"
    assert convert_main(["dcp-to-hf", "--adapter-only", "--hf-dir", str(tiny_hf_dir), "--dcp-dir",
                         str(lora_ckpt["save"]), "--save-dir", str(out)]) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    # gate/up/down Linears go through target_parameters (PEFT would move target_modules of those names onto
    # the routed experts); the routed experts' stacked tensors too
    assert not any(t.endswith(("gate_proj", "up_proj", "down_proj")) for t in config["target_modules"])
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in config["target_parameters"]
    assert "model.language_model.layers.0.mlp.gate_proj.weight" in config["target_parameters"]
    assert "model.language_model.layers.2.mlp.shared_experts.down_proj.weight" in config["target_parameters"]

    merged_dir = lora_ckpt.get("merged")
    if merged_dir is None:
        pytest.skip("needs test_merged_export_equals_the_lora_model first")
    n_lora = assert_peft_equals_merged(HF, tiny_hf_dir, merged_dir, out, lora_ckpt["model"], _sample(lora_ckpt["model"]),
                                       experts_implementation="eager")
    assert n_lora == len(json.loads((out / "adapter_config.json").read_text())["target_modules"]) + len(
        config["target_parameters"])


def assert_peft_equals_merged(HF, base_dir, merged_dir, peft_dir, model, sample, **load_kw) -> int:
    """transformers' `HF` loads the merged export and, with peft, base + the adapter dir; both give the LoRA
    model's logits on `sample` (ids, pixels, grid) within 1e-4 (also used by the dense LoRA tests). Returns
    the number of adapted modules PEFT made (its lora_A parameters)."""
    from peft import PeftModel

    kw = dict(dtype=torch.float32, attn_implementation="eager", **load_kw)
    merged = HF.from_pretrained(merged_dir, **kw).eval()
    peft_model = PeftModel.from_pretrained(HF.from_pretrained(base_dir, **kw).eval(), peft_dir).eval()
    ids, pix, grid = sample
    kwargs = hf_kwargs(model.config, ids, pix, grid)
    with torch.no_grad():
        want, got = merged(**kwargs).logits, peft_model(**kwargs).logits
        ours = model(ids, pix, grid).logits
    torch.testing.assert_close(want, ours, rtol=0, atol=1e-4)  # transformers reads the merged export the same
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    return sum("lora_A" in n for n, _ in peft_model.named_parameters())


def test_adapter_only_of_a_full_checkpoint_is_an_error(tmp_path, tiny_hf_dir, capsys):
    from mmtune.convert import hf_to_dcp

    hf_to_dcp(tiny_hf_dir, tmp_path / "dcp", progress=False)
    assert convert_main(["dcp-to-hf", "--adapter-only", "--hf-dir", str(tiny_hf_dir), "--dcp-dir",
                         str(tmp_path / "dcp"), "--save-dir", str(tmp_path / "out")]) == 1
    assert "not a LoRA checkpoint" in capsys.readouterr().err


def test_generate_loads_a_lora_checkpoint_with_the_merged_logits(lora_ckpt, tiny_hf_dir):
    from mmtune.generate import load_model

    model, hf = load_model(lora_ckpt["save"], hf_dir=tiny_hf_dir)
    ids, pix, grid = _sample(lora_ckpt["model"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, pix, grid).logits, lora_ckpt["model"](ids, pix, grid).logits,
                                   rtol=0, atol=1e-5)
    assert hf == tiny_hf_dir
    # in bf16 every tensor has the dtype loading the HF dir gives it: the router (mlp.gate) stays fp32
    dtypes = lambda m: {n: t.dtype for n, t in [*m.named_parameters(), *m.named_buffers()]}  # noqa: E731
    want = dtypes(load_model(tiny_hf_dir, dtype=torch.bfloat16)[0])
    assert torch.float32 in want.values() and torch.bfloat16 in want.values()
    got = dtypes(load_model(lora_ckpt["save"], hf_dir=tiny_hf_dir, dtype=torch.bfloat16)[0])
    assert got == want, {n: (got.get(n), want[n]) for n in want if got.get(n) != want[n]}
