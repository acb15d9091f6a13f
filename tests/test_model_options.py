"""model.json's runtime choices applied from outside the model: attn_implementation per tower (and
--use-flash-attn), use_npu_fused_moe, activation_offload (save-on-CPU hooks on the decoder blocks); and
--log-tps / data.json num_workers and pin_memory reaching what they configure."""

from __future__ import annotations

import torch

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config
from mmtune.ops import attention as att
from mmtune.ops import moe
from mmtune.train.args import ModelJsonConfig
from mmtune.train.model_options import apply_model_options, attention_backends
from test_model import image_sample


def _model(seed: int = 0) -> Glm4vMoeForConditionalGeneration:
    torch.manual_seed(seed)
    model = Glm4vMoeForConditionalGeneration(tiny_config())
    model.init_weights(seed=seed)
    return model


def _packed_batch(cfg):
    ids, px, grid = image_sample(cfg, [(1, 4, 6), (1, 4, 4)], text_len=9, seed=1)
    L = ids.shape[1]
    return torch.cat([ids, ids]), dict(pixel_values=torch.cat([px, px]), image_grid_thw=torch.cat([grid, grid]),
                                       position_ids=torch.arange(L).expand(3, 2, L),
                                       cu_seqlens=torch.tensor([0, 7, L, 2 * L], dtype=torch.int32))


def test_attn_implementation_picks_each_towers_backend(monkeypatch):
    """flash_attention_2 -> the varlen kernel (a reference kernel stands in for CUDA's here), sdpa -> SDPA,
    eager -> SDPA's math kernel; the same numbers every way."""
    def model_json(vision, text):
        return ModelJsonConfig.model_validate({"image_encoder": {"vision_encoder": {"attn_implementation": vision}},
                                               "text_decoder": {"attn_implementation": text}})

    assert attention_backends(model_json("sdpa", "flash_attention_2")) == ("sdpa", "flash")
    assert attention_backends(model_json("eager", "sdpa")) == ("eager", "sdpa")
    assert attention_backends(model_json("sdpa", "sdpa"), use_flash_attn=True) == ("flash", "flash")

    calls, kernels = [], []

    def fake_varlen_attn(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
        calls.append(window_size)
        bounds = cu_q.tolist()
        return torch.cat([torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], v[a:b].transpose(0, 1)[None],
            is_causal=window_size == (-1, 0), scale=scale, enable_gqa=enable_gqa)[0].transpose(0, 1)
            for a, b in zip(bounds, bounds[1:])])

    real_kernel = att.sdpa_kernel
    monkeypatch.setattr(att, "_varlen_ok", lambda q: True)
    monkeypatch.setattr(att, "_varlen_attn", lambda: fake_varlen_attn)
    monkeypatch.setattr(att, "sdpa_kernel", lambda b: kernels.append(b) or real_kernel(b))
    model = _model()
    cfg = model.config
    ids, kw = _packed_batch(cfg)
    outs = {}
    for vision, text in (("sdpa", "sdpa"), ("sdpa", "flash"), ("flash", "flash"), ("eager", "eager")):
        calls.clear(), kernels.clear()
        counts = apply_model_options(model, vision_attn=vision, text_attn=text, grouped_mm=True)
        assert counts["vision_attn"] == cfg.vision.depth and counts["text_attn"] == cfg.text.num_hidden_layers
        outs[vision, text] = model(ids, **kw).logits
        assert calls.count((-1, 0)) == (cfg.text.num_hidden_layers if text == "flash" else 0), (vision, text)
        assert calls.count((-1, -1)) == (cfg.vision.depth if vision == "flash" else 0), (vision, text)
        n_eager = (cfg.vision.depth if vision == "eager" else 0) + (cfg.text.num_hidden_layers if text == "eager" else 0)
        assert kernels.count(torch.nn.attention.SDPBackend.MATH) == n_eager
    for key, logits in outs.items():
        torch.testing.assert_close(logits, outs["sdpa", "sdpa"], atol=1e-5, rtol=0, msg=str(key))


def test_use_npu_fused_moe_false_runs_the_expert_loop(monkeypatch):
    model = _model()
    ids = torch.randint(0, 400, (2, 12), generator=torch.Generator().manual_seed(0))
    seen = []
    real = moe.grouped_mm
    monkeypatch.setattr(moe, "grouped_mm", lambda *a, **k: seen.append(1) or real(*a, **k))
    grouped = model(ids).logits
    assert seen and apply_model_options(model, vision_attn="sdpa", text_attn="sdpa", grouped_mm=False)["experts"] == 2
    seen.clear()
    looped = model(ids).logits
    assert not seen
    torch.testing.assert_close(looped, grouped, atol=1e-5, rtol=1e-5)


def test_activation_offload_moves_saved_activations_not_weights_and_keeps_gradients():
    from mmtune.distributed.parallelize import FSDPOptions, parallelize

    cfg = tiny_config()
    ids, px, grid = image_sample(cfg, [(1, 4, 4)], text_len=12, seed=2)

    def loss_and_grads(opts):
        model = _model(seed=3)
        stats = {"tensors": 0, "bytes": 0, "kept": 0}
        if opts is not None:
            import mmtune.distributed.offload as off

            real = off.apply_activation_offload
            off.apply_activation_offload = lambda blocks, **kw: real(blocks, **{**kw, "stats": stats})
            try:
                parallelize(model, None, opts, torch.device("cpu"))
            finally:
                off.apply_activation_offload = real
        out = model(ids, pixel_values=px, image_grid_thw=grid)
        out.logits.float().logsumexp(-1).mean().backward()
        return out.logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, stats

    ref_logits, ref_grads, _ = loss_and_grads(None)
    for opts, offloaded_blocks in ((FSDPOptions(activation_offload=True), 3),
                                   (FSDPOptions(activation_offload=True, activation_checkpointing=True,
                                                recompute_num_layers=1), 2)):
        logits, grads, stats = loss_and_grads(opts)
        assert stats["tensors"] > 4 * offloaded_blocks and stats["kept"] > 0, stats  # weights stay, activations go
        torch.testing.assert_close(logits, ref_logits, atol=0, rtol=0)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-6, rtol=1e-5, msg=name)
    # only the blocks that are not recomputed get the hooks
    from mmtune.distributed.offload import apply_activation_offload

    blocks = list(_model().model.language_model.layers)
    assert apply_activation_offload(blocks, skip={0, 1}) == 1


def test_log_tps_shows_throughput_in_the_console_line():
    from mmtune.train.metrics import MetricsLogger, StepStats

    for on in (True, False):
        printed = []
        m = MetricsLogger(metrics_file=None, tensorboard_dir=None, train_iters=2, flops_per_token=None,
                          device=torch.device("cpu"), world_size=1, enabled=True, log_tps=on,
                          print_fn=lambda *a, **k: printed.append(a[0]))
        m.record(StepStats(step=1, loss=1.0, lr=1e-3, grad_norm=0.5, tokens=100, samples=2, step_time=0.1), log=True)
        assert ("tokens/s" in printed[0]) == on
