"""The native GLM-4.5V model against transformers' Glm4vMoeForConditionalGeneration (fp32, CPU), and
its own invariants: packed rows, padded rows, meta-device build, KV-cache decoding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mmtune.models.glm4v_moe import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration, glm45v_config, tiny_config
from mmtune.models.glm4v_moe.rope import mm_token_types


def config_a() -> Glm4vMoeConfig:
    """The embedded tiny config: plain top-2 of 4, normalised weights, GQA 4/2, one dense layer."""
    return tiny_config()


def config_b() -> Glm4vMoeConfig:
    """Group-limited routing (4 groups, keep 2), top-3 of 8, no normalisation, scaling 2.5, two shared
    experts, MQA (1 kv head), no dense layer, vision qkv bias."""
    c = tiny_config()
    text = dataclasses.replace(
        c.text, n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=3, norm_topk_prob=False,
        routed_scaling_factor=2.5, n_shared_experts=2, num_key_value_heads=1, first_k_dense_replace=0,
        num_hidden_layers=2,
    )
    vision = dataclasses.replace(c.vision, attention_bias=True, num_heads=4)
    return dataclasses.replace(c, text=text, vision=vision)


CONFIGS = {"a": config_a, "b": config_b}


def hf_model(cfg: Glm4vMoeConfig):
    from transformers import Glm4vMoeConfig as HFConfig
    from transformers import Glm4vMoeForConditionalGeneration as HF

    hf_cfg = HFConfig(**cfg.to_dict())
    return HF._from_config(hf_cfg, attn_implementation="eager", experts_implementation="eager").eval()


def make_pair(cfg: Glm4vMoeConfig, seed: int = 0):
    """Our model (random init, random router bias so that selection and weights differ) and HF's
    with the same weights."""
    ours = Glm4vMoeForConditionalGeneration(cfg).eval()
    ours.init_weights(seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight", "layernorm.weight", "norm.weight")) or "bias" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # not all ones / zeros: tested too
        for name, b in ours.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.2)
    hf = hf_model(cfg)
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not missing and not unexpected
    return ours, hf


def image_sample(cfg: Glm4vMoeConfig, grids: list[tuple[int, int, int]], text_len: int, seed: int = 0):
    """Token ids: text, then for each image <begin> placeholders <end> text; plus pixel rows and grids."""
    g = torch.Generator().manual_seed(seed)
    m2 = cfg.vision.spatial_merge_size**2
    ids: list[int] = torch.randint(0, 400, (text_len,), generator=g).tolist()
    for t, h, w in grids:
        ids += [cfg.image_start_token_id] + [cfg.image_token_id] * (t * h * w // m2) + [cfg.image_end_token_id]
        ids += torch.randint(0, 400, (5,), generator=g).tolist()
    patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(patches, cfg.vision.patch_dim, generator=g) if grids else None
    grid = torch.tensor(grids) if grids else None
    return torch.tensor([ids]), pixels, grid


def hf_kwargs(cfg: Glm4vMoeConfig, input_ids, pixels, grid):
    kw = dict(input_ids=input_ids)
    if grid is not None:
        types = torch.stack([
            mm_token_types(row, image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
                           video_end_token_id=cfg.video_end_token_id) for row in input_ids
        ])
        kw.update(pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=types)
    return kw


SAMPLES = {
    "two_images": dict(grids=[(1, 4, 6), (1, 8, 4)], text_len=7),
    "image_long_text": dict(grids=[(1, 6, 6)], text_len=300),
    "text_only": dict(grids=[], text_len=40),
}


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_logits_and_grads_equal_transformers(cfg_name):
    cfg = CONFIGS[cfg_name]()
    ours, hf = make_pair(cfg)
    for name, spec in SAMPLES.items():
        input_ids, pixels, grid = image_sample(cfg, **spec)
        out = ours(input_ids, pixel_values=pixels, image_grid_thw=grid)
        ref = hf(**hf_kwargs(cfg, input_ids, pixels, grid), output_router_logits=True)
        diff = (out.logits - ref.logits).abs().max().item()
        assert diff <= 1e-4, f"{cfg_name}/{name}: logits differ by {diff}"
        moe_layers = cfg.text.num_hidden_layers - cfg.text.first_k_dense_replace
        assert len(out.router_logits) == moe_layers
        for ours_r, ref_r in zip(out.router_logits, ref.router_logits):
            assert ours_r.dtype == torch.float32 and ours_r.shape == (input_ids.numel(), cfg.text.n_routed_experts)
            torch.testing.assert_close(ours_r, ref_r, atol=1e-4, rtol=0)

    # gradients of a loss, for every parameter, on the two-image sample
    input_ids, pixels, grid = image_sample(cfg, **SAMPLES["two_images"])
    w = torch.randn(input_ids.shape[1], cfg.text.vocab_size, generator=torch.Generator().manual_seed(3))
    (ours(input_ids, pixel_values=pixels, image_grid_thw=grid).logits[0] * w).sum().backward()
    (hf(**hf_kwargs(cfg, input_ids, pixels, grid)).logits[0] * w).sum().backward()
    assert_grads_close(ours, hf, unused_ok=True)


def assert_grads_close(ours, hf, unused_ok: bool) -> None:
    """Every parameter's gradient equals that of transformers' parameter of the same name within 1e-4 of
    its largest entry (also the dense model's test). `unused_ok`: a parameter transformers gave no gradient
    (an expert no token chose) must have none or zeros; otherwise every parameter needs one."""
    ref_grads = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        ref = ref_grads[name].grad
        if ref is None and unused_ok:
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        assert p.grad is not None and ref is not None, name
        scale = ref.abs().max().item() + 1e-6
        err = (p.grad - ref).abs().max().item()
        assert err <= 1e-4 * max(1.0, scale), f"{name}: grad differs by {err} (max |grad| {scale})"


def test_packed_row_equals_separate_runs():
    cfg = config_a()
    model, _ = make_pair(cfg)
    a_ids, a_px, a_grid = image_sample(cfg, [(1, 4, 6)], text_len=9, seed=1)
    b_ids, b_px, b_grid = image_sample(cfg, [(1, 6, 4), (1, 4, 4)], text_len=5, seed=2)
    sep_a = model(a_ids, pixel_values=a_px, image_grid_thw=a_grid).logits[0]
    sep_b = model(b_ids, pixel_values=b_px, image_grid_thw=b_grid).logits[0]

    la, lb, pad = a_ids.shape[1], b_ids.shape[1], 3
    pad_id = cfg.text.pad_token_id
    packed = torch.cat([a_ids[0], b_ids[0], torch.full((pad,), pad_id)])[None]
    pos_a = model(a_ids, pixel_values=a_px, image_grid_thw=a_grid, return_logits=False)  # noqa: F841 (warm)
    from mmtune.models.glm4v_moe.rope import get_rope_index

    kw = dict(image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
              video_end_token_id=cfg.video_end_token_id)
    positions = torch.cat([get_rope_index(a_ids[0], a_grid, **kw)[0], get_rope_index(b_ids[0], b_grid, **kw)[0],
                           torch.arange(pad).expand(3, pad)], dim=1)[:, None]
    cu = torch.tensor([0, la, la + lb, la + lb + pad], dtype=torch.int32)
    out = model(packed, pixel_values=torch.cat([a_px, b_px]), image_grid_thw=torch.cat([a_grid, b_grid]),
                position_ids=positions, cu_seqlens=cu).logits[0]
    torch.testing.assert_close(out[:la], sep_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[la:la + lb], sep_b, atol=1e-5, rtol=0)

    # two rows of the batch are segments too (cu_seqlens over the flattened B*S tokens)
    two_rows = torch.stack([packed[0], packed[0]])
    cu2 = torch.cat([cu, cu[1:] + packed.shape[1]])
    out2 = model(two_rows, pixel_values=torch.cat([a_px, b_px] * 2), image_grid_thw=torch.cat([a_grid, b_grid] * 2),
                 position_ids=positions.expand(3, 2, -1), cu_seqlens=cu2).logits
    torch.testing.assert_close(out2[1, :la], sep_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(out2[1, la:la + lb], sep_b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_separate_runs(side):
    cfg = config_a()
    model, _ = make_pair(cfg)
    a_ids, a_px, a_grid = image_sample(cfg, [(1, 4, 6)], text_len=20, seed=1)
    b_ids, _, _ = image_sample(cfg, [], text_len=9, seed=2)
    sep_a = model(a_ids, pixel_values=a_px, image_grid_thw=a_grid).logits[0]
    sep_b = model(b_ids).logits[0]
    L, lb = a_ids.shape[1], b_ids.shape[1]
    pad = torch.full((L - lb,), cfg.text.pad_token_id)
    b_row = torch.cat([pad, b_ids[0]]) if side == "left" else torch.cat([b_ids[0], pad])
    mask = torch.ones(2, L, dtype=torch.long)
    mask[1] = (b_row != cfg.text.pad_token_id).long()
    out = model(torch.stack([a_ids[0], b_row]), pixel_values=a_px, image_grid_thw=a_grid, attention_mask=mask).logits
    torch.testing.assert_close(out[0], sep_a, atol=1e-5, rtol=0)
    real = mask[1].bool()
    torch.testing.assert_close(out[1, real], sep_b, atol=1e-5, rtol=0)


def test_meta_build_has_transformers_parameter_count():
    from transformers import Glm4vMoeConfig as HFConfig
    from transformers import Glm4vMoeForConditionalGeneration as HF

    cfg = glm45v_config()
    with torch.device("meta"):
        ours = Glm4vMoeForConditionalGeneration(cfg)
        hf = HF._from_config(HFConfig(**cfg.to_dict()))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert all(p.is_meta for p in ours.parameters()) and all(b.is_meta for b in ours.buffers())
    assert count(ours) == count(hf)
    assert 105e9 < count(ours) < 110e9
    shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert shapes == {k: v.shape for k, v in hf.state_dict().items()}
    assert ours.model.language_model.layers[1].mlp.gate.weight.dtype == torch.float32


def test_init_weights_is_deterministic_and_works_after_to_empty():
    cfg = config_a()
    a = Glm4vMoeForConditionalGeneration(cfg)
    a.init_weights(seed=7)
    with torch.device("meta"):
        b = Glm4vMoeForConditionalGeneration(cfg)
    b.to_empty(device="cpu")
    b.init_weights(seed=7)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    sd = a.state_dict()
    assert torch.all(sd["model.language_model.norm.weight"] == 1)
    assert torch.all(sd["model.language_model.layers.1.mlp.gate.e_score_correction_bias"] == 0)
    assert torch.all(sd["model.language_model.layers.0.self_attn.q_proj.bias"] == 0)
    std = sd["model.language_model.layers.1.mlp.experts.gate_up_proj"].std().item()
    assert abs(std - cfg.text.initializer_range) < 0.002
    c = Glm4vMoeForConditionalGeneration(cfg)
    c.init_weights(seed=8)
    assert not torch.equal(c.lm_head.weight, a.lm_head.weight)


def test_return_hidden_only_and_dummy_vision():
    cfg = config_a()
    model, _ = make_pair(cfg)
    ids, _, _ = image_sample(cfg, [], text_len=12)
    full = model(ids)
    hid = model(ids, return_logits=False, run_vision_without_images=True)
    assert hid.logits is None
    torch.testing.assert_close(hid.hidden_states, full.hidden_states, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.lm_head(hid.hidden_states), full.logits, atol=1e-6, rtol=0)
    hid.hidden_states.sum().backward()
    # the vision tower took part in the graph (FSDP needs its gradients to exist), with zero gradients
    g = model.model.visual.blocks[0].attn.qkv.weight.grad
    assert g is not None and torch.all(g == 0)


def test_kv_cache_greedy_decoding_equals_full_recompute():
    cfg = config_a()
    model, _ = make_pair(cfg)
    ids, px, grid = image_sample(cfg, [(1, 4, 6)], text_len=6, seed=4)
    with torch.no_grad():
        out = model(ids, pixel_values=px, image_grid_thw=grid, use_cache=True)
        cache, seq = out.past_key_values, ids
        for _ in range(5):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            full = model(torch.cat([seq, nxt], 1), pixel_values=px, image_grid_thw=grid).logits[:, -1]
            out = model(nxt, past_key_values=cache, use_cache=True)
            torch.testing.assert_close(out.logits[:, -1], full, atol=1e-5, rtol=0)
            seq = torch.cat([seq, nxt], 1)
        assert cache.get_seq_length() == seq.shape[1]

        # prefill with explicit 3D positions (as a packed-batch caller would): decoding continues after them
        from mmtune.models.glm4v_moe.rope import get_rope_index

        pos, _ = get_rope_index(ids[0], grid, image_token_id=cfg.image_token_id,
                                video_start_token_id=cfg.video_start_token_id, video_end_token_id=cfg.video_end_token_id)
        out = model(ids, pixel_values=px, image_grid_thw=grid, position_ids=pos[:, None], use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        step = model(nxt, past_key_values=out.past_key_values, use_cache=True).logits[:, -1]
        full = model(torch.cat([ids, nxt], 1), pixel_values=px, image_grid_thw=grid).logits[:, -1]
        torch.testing.assert_close(step, full, atol=1e-5, rtol=0)


def test_bad_inputs_raise_clear_errors():
    cfg = config_a()
    model, _ = make_pair(cfg)
    ids, px, grid = image_sample(cfg, [(1, 4, 6)], text_len=6)
    one_less = ids[ids != cfg.image_token_id].tolist() + [cfg.image_token_id] * 5
    with pytest.raises(ValueError, match=r"hold 5 <\|image\|> tokens"):
        zeros = torch.zeros(3, 1, len(one_less), dtype=torch.long)
        model(torch.tensor([one_less]), pixel_values=px, image_grid_thw=grid, position_ids=zeros)
    with pytest.raises(ValueError, match="pixel_values has"):
        model(ids, pixel_values=px[:-1], image_grid_thw=grid)
    text_ids, _, _ = image_sample(cfg, [], text_len=6)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(text_ids, cu_seqlens=torch.tensor([0, 3], dtype=torch.int32))
    two_rows = torch.cat([text_ids, text_ids])
    n = text_ids.shape[1]
    with pytest.raises(ValueError, match=f"row boundary.*{n} is missing"):
        model(two_rows, cu_seqlens=torch.tensor([0, 3, 2 * n], dtype=torch.int32))


def test_left_padded_batch_decodes_like_separate_runs():
    """Batched greedy decoding with a KV cache, left padding and mask-per-step (as `mmtune generate`)."""
    cfg = config_a()
    model, _ = make_pair(cfg)
    a_ids, a_px, a_grid = image_sample(cfg, [(1, 4, 4)], text_len=8, seed=5)
    b_ids, _, _ = image_sample(cfg, [], text_len=5, seed=6)
    L = a_ids.shape[1]
    pad = torch.full((L - b_ids.shape[1],), cfg.text.pad_token_id)
    ids = torch.stack([a_ids[0], torch.cat([pad, b_ids[0]])])
    mask = (torch.arange(L) >= L - b_ids.shape[1]).long().expand(2, L).clone()
    mask[0] = 1
    with torch.no_grad():
        out = model(ids, pixel_values=a_px, image_grid_thw=a_grid, attention_mask=mask, use_cache=True)
        seqs = [a_ids, b_ids]
        for _ in range(4):
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            seqs = [torch.cat([s, n[None]], 1) for s, n in zip(seqs, nxt)]
            out = model(nxt, attention_mask=torch.ones(2, 1, dtype=torch.long), past_key_values=out.past_key_values,
                        use_cache=True)
            ref_a = model(seqs[0], pixel_values=a_px, image_grid_thw=a_grid).logits[0, -1]
            ref_b = model(seqs[1]).logits[0, -1]
            torch.testing.assert_close(out.logits[0, -1], ref_a, atol=1e-5, rtol=0)
            torch.testing.assert_close(out.logits[1, -1], ref_b, atol=1e-5, rtol=0)


def test_row_bounds_only_cu_seqlens_equals_plain_rows():
    cfg = config_a()
    model, _ = make_pair(cfg)
    ids = torch.randint(0, 400, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = model(ids).logits
    cu = torch.tensor([0, 16, 32], dtype=torch.int32)
    pos = torch.arange(16).expand(3, 2, 16)
    torch.testing.assert_close(model(ids, position_ids=pos, cu_seqlens=cu).logits, plain, atol=1e-6, rtol=0)


def test_grouped_mm_and_expert_loop_fallback_agree(monkeypatch):
    """The grouped-matmul path and the honest per-expert loop give the same outputs and gradients,
    also when some experts get no token."""
    from mmtune.ops import moe

    torch.manual_seed(0)
    experts = moe.GroupedExperts(num_experts=6, hidden_size=16, intermediate_size=8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.2)
    torch.nn.init.normal_(experts.down_proj, std=0.2)
    x = torch.randn(10, 16)
    ids = torch.randint(0, 4, (10, 2))  # experts 4 and 5 get nothing
    ids[:, 1] = (ids[:, 0] + 1) % 4
    w = torch.rand(10, 2)
    assert moe._grouped_mm_ok(x, experts.gate_up_proj)

    def run():
        experts.zero_grad()
        xx = x.clone().requires_grad_()
        out = experts(xx, w, ids)
        (out * torch.arange(16.0)).sum().backward()
        return out, xx.grad, experts.gate_up_proj.grad.clone(), experts.down_proj.grad.clone()

    grouped = run()
    monkeypatch.setattr(moe, "_grouped_mm_ok", lambda *a: False)
    looped = run()
    for a, b in zip(grouped, looped):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    ref = sum(w[:, k, None] * torch.stack([
        experts.down_proj[e] @ (torch.nn.functional.silu(experts.gate_up_proj[e, :8] @ x[t]) * (experts.gate_up_proj[e, 8:] @ x[t]))
        for t, e in enumerate(ids[:, k].tolist())]) for k in range(2))
    torch.testing.assert_close(grouped[0], ref.detach(), atol=1e-5, rtol=1e-5)


def test_varlen_plumbing_with_a_stand_in_kernel(monkeypatch):
    """The CUDA varlen path (flattening, cu_seqlens, causal window, GQA, un-flattening) run on CPU with a
    reference kernel standing in for torch's flash varlen_attn: logits equal the SDPA path's."""
    from mmtune.ops import attention as att

    calls = []

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(window_size)
        assert q.dim() == 3 and q.is_contiguous() and cu_q.dtype == torch.int32 and max_q == max_k
        assert enable_gqa == (q.shape[1] != k.shape[1])
        bounds = cu_q.tolist()
        outs = [
            torch.nn.functional.scaled_dot_product_attention(
                q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
                is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])
        ]
        return torch.cat(outs)

    cfg = config_a()
    model, _ = make_pair(cfg)
    a_ids, a_px, a_grid = image_sample(cfg, [(1, 4, 6), (1, 4, 4)], text_len=9, seed=1)
    L = a_ids.shape[1]
    ids = torch.cat([a_ids, a_ids])
    kw = dict(pixel_values=torch.cat([a_px, a_px]), image_grid_thw=torch.cat([a_grid, a_grid]),
              position_ids=torch.arange(L).expand(3, 2, L), cu_seqlens=torch.tensor([0, 7, L, 2 * L], dtype=torch.int32))
    ref = model(ids, **kw).logits
    monkeypatch.setattr(att, "_varlen_ok", lambda q: True)
    monkeypatch.setattr(att, "_varlen_attn", lambda: fake_varlen_attn)
    torch.testing.assert_close(model(ids, **kw).logits, ref, atol=1e-5, rtol=0)
    # every text layer (causal) and every vision block (full) went through the varlen kernel
    assert calls.count((-1, 0)) == cfg.text.num_hidden_layers and calls.count((-1, -1)) == cfg.vision.depth


def video_sample(cfg: Glm4vMoeConfig, items: list[tuple[str, tuple[int, int, int]]], text_len: int = 5, seed: int = 0):
    """Token ids with images and videos as the processor lays them out (a video: <|begin_of_video|>, then
    per temporal patch <|begin_of_image|> + h*w/4 placeholders + <|end_of_image|> + timestamp text,
    <|end_of_video|>); pixel rows and grids for the images and for the videos."""
    g = torch.Generator().manual_seed(seed)
    m2 = cfg.vision.spatial_merge_size**2
    ids: list[int] = torch.randint(0, 400, (text_len,), generator=g).tolist()
    grids = {"image": [], "video": []}
    for kind, (t, h, w) in items:
        if kind == "image":
            ids += [cfg.image_start_token_id] + [cfg.image_token_id] * (t * h * w // m2) + [cfg.image_end_token_id]
        else:
            ids.append(cfg.video_start_token_id)
            for k in range(t):
                ids += [cfg.image_start_token_id] + [cfg.image_token_id] * (h * w // m2) + [cfg.image_end_token_id]
                ids += torch.randint(0, 400, (1 + k % 2,), generator=g).tolist()  # the timestamp digits
            ids.append(cfg.video_end_token_id)
        grids[kind].append((t, h, w))
        ids += torch.randint(0, 400, (3,), generator=g).tolist()
    out = {}
    for kind, key in (("image", "pixel_values"), ("video", "pixel_values_videos")):
        if grids[kind]:
            rows = sum(t * h * w for t, h, w in grids[kind])
            out[key] = torch.randn(rows, cfg.vision.patch_dim, generator=g)
            out["image_grid_thw" if kind == "image" else "video_grid_thw"] = torch.tensor(grids[kind])
    return torch.tensor([ids]), out


def _hf_types(cfg, input_ids):
    return mm_token_types(input_ids, image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
                          video_end_token_id=cfg.video_end_token_id)


def test_video_logits_equal_transformers():
    """A video (and two videos) through transformers' own video path; images and videos mixed through
    transformers' vision features and rope index (its forward cannot mix them: it fills both with the
    same placeholder mask), all within 1e-4."""
    cfg = config_a()
    ours, hf = make_pair(cfg)
    for items in ([("video", (2, 4, 6))], [("video", (3, 4, 4)), ("video", (1, 8, 4))]):
        ids, kw = video_sample(cfg, items)
        out = ours(ids, **kw).logits
        ref = hf(input_ids=ids, mm_token_type_ids=_hf_types(cfg, ids), **kw).logits
        diff = (out - ref).abs().max().item()
        assert diff <= 1e-4, f"{items}: logits differ by {diff}"

    ids, kw = video_sample(cfg, [("image", (1, 4, 6)), ("video", (2, 4, 4)), ("image", (1, 4, 4)), ("video", (1, 6, 4))])
    types = _hf_types(cfg, ids)
    with torch.no_grad():
        img = torch.cat(hf.model.get_image_features(kw["pixel_values"], kw["image_grid_thw"]).pooler_output)
        vid = torch.cat(hf.model.get_video_features(kw["pixel_values_videos"], kw["video_grid_thw"]).pooler_output)
        embeds = hf.model.get_input_embeddings()(ids)
        embeds[types == 1], embeds[types == 2] = img, vid
        pos, _ = hf.model.get_rope_index(ids, types, kw["image_grid_thw"], kw["video_grid_thw"].clone())
        ref = hf(inputs_embeds=embeds, position_ids=pos).logits
    out = ours(ids, **kw)
    diff = (out.logits - ref).abs().max().item()
    assert diff <= 1e-4, f"image + video: logits differ by {diff}"
    # a row with a video, packed next to an image row, equals it alone (3D positions restart per sample)
    a_ids, a_kw = video_sample(cfg, [("video", (2, 4, 4))], seed=1)
    b_ids, b_kw = video_sample(cfg, [("image", (1, 4, 4))], seed=2)
    pos = torch.cat([ours._position_ids(x, k.get("image_grid_thw"), k.get("video_grid_thw"), None, None, 0)
                     for x, k in ((a_ids, a_kw), (b_ids, b_kw))], dim=2)
    packed = ours(torch.cat([a_ids, b_ids], 1), **a_kw, **b_kw, position_ids=pos,
                  cu_seqlens=torch.tensor([0, a_ids.shape[1], a_ids.shape[1] + b_ids.shape[1]], dtype=torch.int32))
    torch.testing.assert_close(packed.logits[0, : a_ids.shape[1]], ours(a_ids, **a_kw).logits[0], atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="inside video spans"):
        ours(ids, pixel_values=kw["pixel_values"], image_grid_thw=kw["image_grid_thw"],
             pixel_values_videos=kw["pixel_values_videos"][:16], video_grid_thw=torch.tensor([[1, 4, 4]]))
