"""StateDictAdapter against transformers: hub (save_pretrained) layout <-> merged in-memory layout."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from mmtune.models.glm4v_moe.checkpoint_names import StateDictAdapter, is_expert_hub_name, native_shapes
from mmtune.models.glm4v_moe.config import tiny_config


def _hf_model(cfg, seed=0):
    import transformers

    hf_cfg = transformers.Glm4vMoeConfig(**cfg.to_dict())
    model = transformers.Glm4vMoeForConditionalGeneration._from_config(hf_cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():  # distinct values everywhere, experts included
            t.copy_(torch.randn(t.shape, generator=g))
    return model


def _other_config():
    cfg = tiny_config()
    cfg.text = dataclasses.replace(cfg.text, first_k_dense_replace=2, num_hidden_layers=4, n_shared_experts=2,
                                   n_routed_experts=6, attention_bias=False, num_key_value_heads=1)
    cfg.vision = dataclasses.replace(cfg.vision, attention_bias=True, intermediate_size=96, out_hidden_size=128)
    return cfg


@pytest.mark.parametrize("make_cfg", [tiny_config, _other_config], ids=["tiny", "other"])
def test_native_shapes_equal_transformers_state_dict(make_cfg):
    cfg = make_cfg()
    model = _hf_model(cfg)
    assert native_shapes(cfg) == {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A checkpoint written by transformers' own save_pretrained, and the model it loads back to."""
    import transformers

    cfg = tiny_config()
    out = tmp_path_factory.mktemp("hf_saved")
    _hf_model(cfg).save_pretrained(out)
    files = sorted(out.glob("*.safetensors"))
    hub = {}
    for f in files:
        hub.update(load_file(f))
    loaded = transformers.Glm4vMoeForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    return cfg, hub, loaded.state_dict()


def test_save_pretrained_writes_hub_names(saved):
    cfg, hub, _ = saved
    assert "model.language_model.layers.1.mlp.experts.3.up_proj.weight" in hub
    assert sum(map(is_expert_hub_name, hub)) == 2 * cfg.text.n_routed_experts * 3


def test_from_hub_reproduces_transformers_loading_bit_exactly(saved):
    cfg, hub, loaded = saved
    # a reversed order splits each layer's experts across the stream, like shards do
    native = dict(StateDictAdapter(cfg).from_hub(reversed(list(hub.items()))))
    assert native.keys() == loaded.keys()
    for k, v in loaded.items():
        assert native[k].dtype == v.dtype and torch.equal(native[k], v), k


def test_to_hub_reproduces_saved_file(saved):
    cfg, hub, loaded = saved
    adapter = StateDictAdapter(cfg)
    out = [item for k, v in loaded.items() for item in adapter.to_hub(k, v)]
    assert len(out) == len(hub)
    for k, v in out:
        assert torch.equal(hub[k], v), k
    planned = [n for k, v in loaded.items() for n, _ in adapter.hub_names_and_shapes(k, tuple(v.shape))]
    assert planned == [k for k, _ in out]


def test_from_hub_streams_one_layer_at_a_time(saved):
    cfg, hub, _ = saved
    items = sorted(hub.items())
    fed = []

    def feed():
        for item in items:
            fed.append(item[0])
            yield item

    for name, _ in StateDictAdapter(cfg).from_hub(feed()):
        if name.endswith("layers.1.mlp.experts.down_proj"):
            # yielded as soon as layer 1's down experts are complete, before layer 2 is read
            assert not any(".layers.2." in n for n in fed)


def test_mtp_and_unknown_tensors_pass_through():
    cfg = tiny_config()
    n = cfg.text.num_hidden_layers
    mtp = f"model.language_model.layers.{n}.mlp.experts.0.gate_proj.weight"
    items = [(mtp, torch.ones(3, 5)), ("something.else", torch.zeros(2))]
    assert [k for k, _ in StateDictAdapter(cfg).from_hub(items)] == [mtp, "something.else"]
    assert StateDictAdapter(cfg).to_hub(f"model.language_model.layers.{n}.mlp.experts.down_proj", torch.ones(2))[0][0].endswith("down_proj")


def test_errors_name_the_tensor():
    cfg = tiny_config()
    a = StateDictAdapter(cfg)
    I, H = cfg.text.moe_intermediate_size, cfg.text.hidden_size
    bad = [("model.language_model.layers.1.mlp.experts.0.gate_proj.weight", torch.zeros(I + 1, H))]
    with pytest.raises(ValueError, match=r"experts\.0\.gate_proj\.weight: shape"):
        list(a.from_hub(bad))
    with pytest.raises(ValueError, match=r"embed_tokens\.weight: shape"):
        list(a.from_hub([("model.language_model.embed_tokens.weight", torch.zeros(3, 3))]))
    incomplete = [(f"model.language_model.layers.1.mlp.experts.{e}.down_proj.weight", torch.zeros(H, I)) for e in range(3)]
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.experts\.3\.down_proj\.weight is missing"):
        list(a.from_hub(incomplete))
    with pytest.raises(ValueError, match="out of range"):
        list(a.from_hub([("model.language_model.layers.1.mlp.experts.9.down_proj.weight", torch.zeros(H, I))]))
    with pytest.raises(ValueError, match="dense layer"):
        list(a.from_hub([("model.language_model.layers.0.mlp.experts.0.down_proj.weight", torch.zeros(H, I))]))
