"""The dense GLM-4.1V / GLM-4.6V-Flash model (`glm4v`) against transformers' Glm4vForConditionalGeneration
(fp32, CPU): logits and every gradient for two tiny configs, packed rows, the real 9B parameter count;
its config reader; and the architecture registry (mmtune.models) that routes everything by model_type."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mmtune.models import ARCHITECTURES, architecture_of, get_architecture, load_config, presets
from mmtune.models.glm4v import Glm4vConfig, Glm4vForConditionalGeneration, glm41v_config, tiny_config
from mmtune.models.glm4v.checkpoint_names import native_shapes
from mmtune.models.glm4v_moe.rope import get_rope_index


def config_a() -> Glm4vConfig:
    """The dense embedded tiny config: GQA 4/2, partial rotary 0.5."""
    return tiny_config()


def config_b() -> Glm4vConfig:
    """MQA (1 kv head), 3 layers, full rotary (partial_rotary_factor 1: 16 pairs), other theta, vision qkv
    bias and 4 vision heads."""
    c = tiny_config()
    text = dataclasses.replace(c.text, num_key_value_heads=1, num_hidden_layers=3, partial_rotary_factor=1.0,
                               mrope_section=[4, 6, 6], rope_theta=500.0, intermediate_size=200)
    vision = dataclasses.replace(c.vision, attention_bias=True, num_heads=4)
    return dataclasses.replace(c, text=text, vision=vision)


CONFIGS = {"a": config_a, "b": config_b}


def hf_model(cfg: Glm4vConfig):
    from transformers import Glm4vConfig as HFConfig
    from transformers import Glm4vForConditionalGeneration as HF

    return HF._from_config(HFConfig(**cfg.to_dict()), attn_implementation="sdpa").eval()


def make_pair(cfg: Glm4vConfig, seed: int = 0):
    """Our model (random init, norms and biases perturbed away from 1 / 0) and transformers' with the same
    weights."""
    ours = Glm4vForConditionalGeneration(cfg).eval()
    ours.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    hf = hf_model(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, hf


def sample(cfg, grids, text_len: int, seed: int = 0):
    """ids [L]: text, then per image <begin> placeholders <end> and 5 text tokens; pixel rows; grids."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (text_len,), generator=g).tolist()
    for t, h, w in grids:
        ids += [cfg.image_start_token_id] + [cfg.image_token_id] * (t * h * w // 4) + [cfg.image_end_token_id]
        ids += torch.randint(0, 400, (5,), generator=g).tolist()
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(patches, cfg.vision.patch_dim, generator=g) if grids else None
    return torch.tensor(ids), pixels, torch.tensor(grids) if grids else None


def hf_forward(hf, cfg, ids_BS, pixels, grid, **kw):
    if grid is not None:
        kw.update(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids_BS == cfg.image_token_id).long())
    return hf(input_ids=ids_BS, use_cache=False, **kw)


SAMPLES = {
    "text_only": dict(grids=[], text_len=40),
    "one_image": dict(grids=[(1, 6, 6)], text_len=60),
    "two_images_different_sizes": dict(grids=[(1, 4, 6), (1, 8, 4)], text_len=7),
}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_logits_and_every_gradient_equal_transformers(cfg_name):
    cfg = CONFIGS[cfg_name]()
    ours, hf = make_pair(cfg)
    for name, spec in SAMPLES.items():
        ids, px, grid = sample(cfg, **spec)
        out = ours(ids[None], pixel_values=px, image_grid_thw=grid)
        ref = hf_forward(hf, cfg, ids[None], px, grid)
        diff = (out.logits - ref.logits).abs().max().item()
        assert diff <= 1e-4, f"{cfg_name}/{name}: logits differ by {diff}"
        assert out.router_logits == ()

    ids, px, grid = sample(cfg, **SAMPLES["two_images_different_sizes"])
    w = torch.randn(ids.shape[0], cfg.text.vocab_size, generator=torch.Generator().manual_seed(3))
    (ours(ids[None], pixel_values=px, image_grid_thw=grid).logits[0] * w).sum().backward()
    (hf_forward(hf, cfg, ids[None], px, grid).logits[0] * w).sum().backward()
    from test_model import assert_grads_close

    assert {n for n, _ in hf.named_parameters()} == {n for n, _ in ours.named_parameters()}
    assert_grads_close(ours, hf, unused_ok=False)


def test_video_logits_equal_transformers():
    """Videos (each temporal step a grid, timestamps between them) through transformers' video path."""
    from test_model import video_sample

    cfg = config_a()
    ours, hf = make_pair(cfg)
    ids, kw = video_sample(cfg, [("video", (3, 4, 4)), ("video", (1, 8, 4))])
    ref = hf(input_ids=ids, mm_token_type_ids=torch.tensor(
        [[2 if t == cfg.image_token_id else 0 for t in ids[0].tolist()]]), use_cache=False, **kw).logits
    diff = (ours(ids, **kw).logits - ref).abs().max().item()
    assert diff <= 1e-4, f"video logits differ by {diff}"


def test_packed_row_equals_transformers_packed_and_separate_runs():
    """Three samples (two images of different sizes, one image, text only) and a pad run packed in one row:
    ours with cu_seqlens + per-sample 3D positions; transformers with its packed form (4-row position ids,
    row 0 the per-sample text positions, no attention mask); and each sample run alone."""
    cfg = config_a()
    ours, hf = make_pair(cfg)
    parts = [sample(cfg, [(1, 4, 6), (1, 8, 4)], 9, seed=1), sample(cfg, [(1, 6, 4)], 5, seed=2),
             sample(cfg, [], 11, seed=3)]
    kw = dict(image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
              video_end_token_id=cfg.video_end_token_id)
    pad = 3
    ids = torch.cat([p[0] for p in parts] + [torch.full((pad,), cfg.text.pad_token_id)])
    pos = torch.cat([get_rope_index(i, g, **kw)[0] for i, _, g in parts] + [torch.arange(pad).expand(3, pad)], dim=1)
    lengths = [len(p[0]) for p in parts] + [pad]
    cu = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    px = torch.cat([p[1] for p in parts if p[1] is not None])
    grid = torch.cat([p[2] for p in parts if p[2] is not None])
    packed = ours(ids[None], pixel_values=px, image_grid_thw=grid, position_ids=pos[:, None], cu_seqlens=cu).logits[0]

    text_pos = torch.cat([torch.arange(n) for n in lengths])
    ref = hf_forward(hf, cfg, ids[None], px, grid, position_ids=torch.cat([text_pos[None], pos])[:, None]).logits[0]
    real = sum(lengths[:-1])
    diff = (packed[:real] - ref[:real]).abs().max().item()
    assert diff <= 1e-4, f"packed logits differ from transformers' packed run by {diff}"
    start = 0
    for ids_i, px_i, grid_i in parts:
        alone = ours(ids_i[None], pixel_values=px_i, image_grid_thw=grid_i).logits[0]
        torch.testing.assert_close(packed[start:start + len(ids_i)], alone, atol=1e-5, rtol=0)
        start += len(ids_i)


def test_kv_cache_decoding_equals_full_recompute():
    cfg = config_a()
    model, _ = make_pair(cfg)
    ids, px, grid = sample(cfg, [(1, 4, 6)], 6, seed=4)
    seq = ids[None]
    with torch.no_grad():
        out = model(seq, pixel_values=px, image_grid_thw=grid, use_cache=True)
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            full = model(seq, pixel_values=px, image_grid_thw=grid).logits[:, -1]
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=0)


def test_eager_fast_paths_equal_their_plain_forms(monkeypatch):
    """The dense decoder's eager shortcuts (docs/PERFORMANCE.md "Dense glm4v train step") against the plain
    forms that bf16 and compiled code take: the complex-number pair rotation, and swiglu's eager backward
    that writes both halves into one buffer (under compile swiglu is the plain formula, autograd's)."""
    import torch.nn.functional as F

    from mmtune.models.glm4v import text as T
    from mmtune.ops.fused import swiglu

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, 16, generator=g).transpose(1, 2)  # [B, heads, S, D], a strided view as in the model
    angles = torch.randn(2, 5, 4, generator=g)
    cos, sin = angles.cos(), angles.sin()
    assert T._complex_view_ok(x[..., :8]) and not T._complex_view_ok(x[..., 1:9])
    plain = torch.cat([T.rotate_pairs(x[..., :8], cos, sin), x[..., 8:]], dim=-1)
    torch.testing.assert_close(T.apply_interleaved_rope(x, cos, sin), plain, atol=1e-6, rtol=0)
    half = T.apply_interleaved_rope(x.bfloat16(), cos.bfloat16(), sin.bfloat16())  # no complex bf16: the plain form
    torch.testing.assert_close(half.float(), plain, atol=0.05, rtol=0)

    gu = torch.randn(3, 7, 2 * 10, generator=g, requires_grad=True)
    grad = torch.randn(3, 7, 10, generator=g)
    gate, up = gu.chunk(2, dim=-1)
    (want,) = torch.autograd.grad(F.silu(gate) * up, gu, grad)
    for compiling in (False, True):
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: compiling)
        out = swiglu(gu)
        (got,) = torch.autograd.grad(out, gu, grad)
        monkeypatch.undo()
        torch.testing.assert_close(out, F.silu(gate) * up, atol=0, rtol=0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0, msg=f"compiling={compiling}")


@pytest.mark.parametrize("backend,seq", [("flash", 512), ("sdpa", 12), ("eager", 12)])
def test_attention_keeps_no_view_of_the_fused_qkv_output(monkeypatch, backend, seq):
    """The fused q/k/v projection's output is not kept for the backward, on any attention path (flash at 512
    tokens is the CPU's chunked kernel): v is a copy, q and k come from the rotary. A view of it would keep
    all N + 2G heads alive where the attention needs G (the activation model of mmtune/plan/activations.py)."""
    from mmtune.models.glm4v.text import DenseAttention
    from mmtune.ops import chunked_attention
    from mmtune.ops.attention import build_mask

    chunked = []
    kernel = chunked_attention.chunked_causal_attention
    monkeypatch.setattr(chunked_attention, "chunked_causal_attention", lambda *a, **k: chunked.append(1) or kernel(*a, **k))

    cfg = config_a()
    attn = DenseAttention(cfg.text, 0)
    attn.attn_backend = backend
    fused = []
    qkv = DenseAttention._qkv
    monkeypatch.setattr(DenseAttention, "_qkv", lambda self, x: fused.append(qkv(self, x)) or fused[-1])
    x = torch.randn(2, seq, cfg.text.hidden_size, requires_grad=True)
    angles = torch.randn(2, seq, cfg.text.rotary_dim // 2)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = attn(x, (angles.cos(), angles.sin()), build_mask(2, seq, device=x.device))
    storage = fused[0].untyped_storage().data_ptr()
    assert saved and not [t.shape for t in saved if t.untyped_storage().data_ptr() == storage]
    assert bool(chunked) == (backend == "flash")
    out.sum().backward()

def test_real_9b_config_on_meta_has_transformers_parameter_count():
    """GLM-4.1V-9B-Thinking's config: the same parameter names, shapes and count as transformers' model
    (10,292,777,472 — also the hub's count for zai-org/GLM-4.6V-Flash); nothing allocated."""
    from transformers import Glm4vConfig as HFConfig
    from transformers import Glm4vForConditionalGeneration as HF

    cfg = glm41v_config()
    with torch.device("meta"):
        ours = Glm4vForConditionalGeneration(cfg)
        hf = HF._from_config(HFConfig(**cfg.to_dict()))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert all(p.is_meta for p in ours.parameters())
    assert count(ours) == count(hf) == 10_292_777_472
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in hf.state_dict().items()}
    assert native_shapes(cfg) == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


@pytest.mark.parametrize("make", [config_a, config_b])
def test_native_shapes_equal_transformers_state_dict(make):
    cfg = make()
    with torch.device("meta"):
        hf = hf_model(cfg)
    assert native_shapes(cfg) == {k: tuple(v.shape) for k, v in hf.state_dict().items()}


# ---- config ----------------------------------------------------------------------------------------
def test_config_round_trip_and_transformers_reads_it(tmp_path):
    from transformers import AutoConfig

    for cfg in (config_a(), config_b(), glm41v_config()):
        cfg.save_pretrained(tmp_path)
        assert Glm4vConfig.from_pretrained(tmp_path) == cfg
        hf = AutoConfig.from_pretrained(tmp_path)
        assert hf.model_type == "glm4v" and hf.text_config.num_key_value_heads == cfg.text.num_key_value_heads
        assert hf.text_config.rope_parameters["partial_rotary_factor"] == cfg.text.partial_rotary_factor


def test_config_reads_the_legacy_forms_and_rejects_bad_ones(tmp_path):
    real = glm41v_config()
    # a pre-4.57 save: text keys at the top level, rope in rope_scaling + rope_theta + partial_rotary_factor
    t = real.text
    flat = {"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "attention_bias": True,
            "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": 40,
            "num_attention_heads": 32, "num_key_value_heads": 2, "vocab_size": 151552, "pad_token_id": 151329,
            "eos_token_id": [151329, 151336, 151338, 151348], "max_position_embeddings": 65536,
            "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
            "rope_scaling": {"type": "default", "mrope_section": [8, 12, 12]}, "image_token_id": 151343,
            "vision_config": {"hidden_size": 1536, "depth": 24, "num_heads": 12, "out_hidden_size": 4096}}
    (tmp_path / "config.json").write_text(json.dumps(flat))
    cfg = Glm4vConfig.from_pretrained(tmp_path)
    assert cfg.text.rotary_dim == 64 and cfg.text.max_position_embeddings == 65536
    assert cfg.vision.intermediate_size == 13696 and cfg.image_token_id == 151343
    assert native_shapes(cfg) == native_shapes(real)

    bad = real.to_dict()
    bad["text_config"]["head_dim"] = 64
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="head_dim 64 differs from hidden_size / num_attention_heads = 128"):
        Glm4vConfig.from_pretrained(tmp_path)
    bad = real.to_dict()
    del bad["text_config"]["rope_parameters"]["partial_rotary_factor"]  # transformers then rotates all 128 dims
    (tmp_path / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match=r"mrope_section \[8, 12, 12\] sums to 32.*partial_rotary_factor 1.0"):
        Glm4vConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "glm4v_moe"}))
    with pytest.raises(ValueError, match="model_type is 'glm4v_moe'"):
        Glm4vConfig.from_pretrained(tmp_path)


# ---- the architecture registry ---------------------------------------------------------------------
def test_registry_routes_by_model_type(tmp_path, tiny_hf_dir):
    assert set(ARCHITECTURES) == {"glm4v_moe", "glm4v"}
    moe, dense = get_architecture("glm4v_moe"), get_architecture("glm4v")
    assert moe.has_experts and not dense.has_experts
    assert architecture_of(tiny_hf_dir) is moe
    arch, cfg = load_config(tiny_hf_dir)
    assert arch.num_experts(cfg) == cfg.text.n_routed_experts == 4
    tiny_config().save_pretrained(tmp_path)
    arch, cfg = load_config(tmp_path)
    assert arch is dense and arch.num_experts(cfg) == 0 and isinstance(cfg, Glm4vConfig)
    assert arch.model_class is Glm4vForConditionalGeneration and arch.config_class is Glm4vConfig
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 2 needs a model with routed experts.*'glm4v'"):
        dense.require_experts("--expert-model-parallel-size 2")
    moe.require_experts("--expert-model-parallel-size 2")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2_vl"}))
    with pytest.raises(ValueError, match="model_type 'qwen2_vl' is not one mmtune knows: glm4v_moe, glm4v"):
        architecture_of(tmp_path)
    names = presets()
    assert {"glm4.5v", "glm4.6v", "glm4.1v-9b", "glm4.6v-flash", "tiny", "tiny-glm4v"} <= set(names)
    assert names["glm4.6v-flash"][0] is dense and names["glm4.6v"][0] is moe


def test_model_json_ids_must_match_config_json():
    dense, moe = get_architecture("glm4v"), get_architecture("glm4v_moe")
    dense.check_model_ids({"model": "glm4v", "vision_encoder": "glm4v", "text_decoder": "glm4v_text"}, "m.json", "c")
    dense.check_model_ids({"model": None, "vision_encoder": None, "text_decoder": None}, "m.json", "c")
    moe.check_model_ids({"model": "glm4v_moe", "vision_encoder": "glm4v_moe", "text_decoder": "glm_4v_moe_text"},
                        "m.json", "c")
    with pytest.raises(ValueError, match=r"m\.json: model_id 'glm4v_moe' contradicts /x/config\.json's model_type "
                                         r"'glm4v'.*write 'glm4v'"):
        dense.check_model_ids({"model": "glm4v_moe"}, "m.json", "/x/config.json")
    with pytest.raises(ValueError, match=r"text_decoder\.model_id 'glm4v_text' contradicts .*'glm4v_moe'"):
        moe.check_model_ids({"model": "glm4v_moe", "text_decoder": "glm4v_text"}, "m.json", "/x/config.json")
