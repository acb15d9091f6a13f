"""--use-torch-compile (mmtune/distributed/compile.py): per-block torch.compile with no graph break, one
compile per block kind for every batch shape, and the same numbers as eager.

Compiling with inductor on this 2-core machine takes minutes for the whole model (C++ code generation and gcc
per kernel), so most checks trace with the `aot_eager` backend (dynamo + AOTAutograd exactly as inductor gets
them, without code generation) and one check runs inductor on one MoE decoder layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from mmtune.distributed.compile import apply_compile, compile_block, compile_counters
from mmtune.distributed.parallelize import apply_activation_checkpointing
from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config


def _batch(seed: int, S: int, bounds: list[int], images: tuple[bool, bool]) -> dict:
    """2 rows of S tokens; `bounds` are the segment bounds over the flattened 2*S tokens (cu_seqlens, as the
    loader makes for packed rows and for padded ones, each pad run a segment); row r starts with an image
    (4 tokens, a [1, 4, 4] grid) when images[r]."""
    cfg = tiny_config()
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 400, (2, S), generator=g)
    grids, pixels = [], []
    for r, has in enumerate(images):
        if has:
            ids[r, 2:6] = cfg.image_token_id
            grids.append([1, 4, 4])
            pixels.append(torch.randn(16, cfg.vision.patch_dim, generator=g))
    pos = torch.zeros(3, 2, S, dtype=torch.long)
    flat = pos.view(3, -1)
    for a, b in zip(bounds, bounds[1:]):
        flat[:, a:b] = torch.arange(b - a)
    labels = torch.randint(0, 400, (2, S), generator=g)
    return {"input_ids": ids, "labels": labels, "position_ids": pos, "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
            "pixel_values": torch.cat(pixels) if pixels else None,
            "image_grid_thw": torch.tensor(grids) if grids else None}


# packed rows and padded rows of different lengths, segment counts and images (training's batch kinds)
BATCHES = [
    _batch(0, 48, [0, 20, 48, 60, 96], (True, False)),
    _batch(1, 64, [0, 64, 70, 100, 128], (True, True)),
    _batch(2, 40, [0, 9, 40, 41, 80], (False, False)),  # text only: the vision tower runs a dummy image
    _batch(3, 72, [0, 30, 33, 72, 144], (False, True)),
]


def _loss_and_grads(model, b):
    model.zero_grad(set_to_none=True)
    out = model(b["input_ids"], pixel_values=b["pixel_values"], image_grid_thw=b["image_grid_thw"],
                position_ids=b["position_ids"], cu_seqlens=b["cu_seqlens"], run_vision_without_images=True)
    loss = F.cross_entropy(out.logits.float().flatten(0, 1), b["labels"].flatten())
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _initialised(model_class, config):
    torch.manual_seed(0)
    model = model_class(config)
    model.init_weights(0)
    return model


@pytest.fixture(scope="module")
def eager_model():
    return _initialised(Glm4vMoeForConditionalGeneration, tiny_config())


@pytest.fixture(scope="module")
def dense_model():
    from mmtune.models.glm4v import Glm4vForConditionalGeneration
    from mmtune.models.glm4v import tiny_config as dense_tiny_config

    # its token ids and vision patch size are the MoE tiny config's, so BATCHES fit it too
    return _initialised(Glm4vForConditionalGeneration, dense_tiny_config())


def _aot_eager_keeping_graphs(graphs: list):
    """The `aot_eager` backend, keeping each graph dynamo hands it (what inductor would get)."""
    from torch._dynamo.backends.registry import lookup_backend

    def backend(gm, example_inputs):
        graphs.append(gm)
        return lookup_backend("aot_eager")(gm, example_inputs)

    return backend


def _assert_aot_cacheable(graphs: list) -> None:
    """Each graph passes AOTAutograd's own cacheability check (the one inductor's compile runs), so a
    later process loads its forward and backward from the cache instead of tracing them again (an
    autograd.Function in the graph fails it: ops/fused.py)."""
    from torch._functorch._aot_autograd.autograd_cache import check_cacheable

    assert graphs
    for gm in graphs:
        check_cacheable(gm)


def _delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


@pytest.mark.parametrize("arch", ["glm4v_moe", "glm4v"])
def test_compiled_blocks_have_no_graph_break_and_compile_once_for_all_shapes(arch, request):
    """torchtitan's order (activation checkpointing, then compile) on every block; aot_eager traces exactly
    what inductor gets, so graph breaks, recompiles and the autograd graph are those of inductor. Every
    graph can be kept in AOTAutograd's cache."""
    eager_model = request.getfixturevalue("eager_model" if arch == "glm4v_moe" else "dense_model")
    model = copy.deepcopy(eager_model)
    apply_activation_checkpointing(model)
    start = compile_counters()
    graphs = []
    n_text = len(model.model.language_model.layers)
    assert apply_compile(model, backend=_aot_eager_keeping_graphs(graphs)) == n_text + 2  # + the vision blocks
    frames = []
    for b in BATCHES:
        loss_c, grads_c = _loss_and_grads(model, b)
        loss_e, grads_e = _loss_and_grads(eager_model, b)
        frames.append(_delta(compile_counters(), start))
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)
    # one graph per block kind (vision block, dense layer, MoE layer; the dense model: vision block, decoder
    # layer), each traced whole, on the first batch; the later batches (other lengths, segment counts,
    # images, a text-only batch) reuse them
    kinds = 3 if arch == "glm4v_moe" else 2
    assert frames[0] == {"graphs": kinds, "frames_compiled": kinds, "graph_breaks": 0}, frames
    assert frames[-1] == frames[0], frames
    _assert_aot_cacheable(graphs)


def test_compiled_moe_layer_equals_eager_with_inductor(eager_model):
    """Inductor's generated kernels (router, grouped-matmul op, segment-attention op, norms, rope, SwiGLU,
    unpermute fused around them) against eager on a MoE decoder layer, the block with every custom piece:
    output, router logits and every gradient within fp32 tolerance. (The other blocks are checked
    exactly through aot_eager above; bench/model_step_cpu.py --compile checks the whole model's loss.)"""
    from mmtune.models.glm4v_moe.text import mrope_cos_sin
    from mmtune.ops.attention import build_mask

    cfg = tiny_config().text
    layer = eager_model.model.language_model.layers[1]
    compiled = compile_block(copy.deepcopy(layer))
    b = BATCHES[1]
    B, S = b["input_ids"].shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, S, cfg.hidden_size, generator=g)
    rope = mrope_cos_sin(cfg, b["position_ids"], x.dtype)
    mask = build_mask(B, S, device=x.device, cu_seqlens=b["cu_seqlens"])
    grad_out = torch.randn(B, S, cfg.hidden_size, generator=g)
    results = []
    for block in (compiled, layer):
        block.zero_grad(set_to_none=True)
        x_in = x.clone().requires_grad_()
        out, logits = block(x_in, rope, mask)
        (out * grad_out).sum().add(logits.logsumexp(-1).sum()).backward()
        results.append((out.detach(), logits.detach(), x_in.grad,
                        {n: p.grad for n, p in block.named_parameters() if p.grad is not None}))
    (out_c, logits_c, gx_c, grads_c), (out_e, logits_e, gx_e, grads_e) = results
    assert compile_counters()["graph_breaks"] == 0
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits_c, logits_e, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx_c, gx_e, rtol=1e-4, atol=1e-5)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) == 15  # q,k,v (+biases), o, router, experts x2, shared x3, norms x2
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-5, msg=name)


def test_mmtune_train_with_compile(tmp_path, tiny_hf_dir, shapes_dir, monkeypatch, capsys):
    """`mmtune train --use-torch-compile`: trains (loss falls), metrics.jsonl marks the step that compiled
    (only the first: later batches of other lengths reuse the graphs) and carries data_wait_s on every row,
    the end line reports the compile time apart from the means, and the thread/worker choice is printed.
    (aot_eager: the decoder graphs of the test above are reused when it ran first.)"""
    import json

    import mmtune.distributed.compile as compile_mod
    from mmtune.train.cli import main
    from test_train_helpers import make_workdir, train_argv

    monkeypatch.setattr(compile_mod, "BACKEND", "aot_eager")
    work = make_workdir(tmp_path, tiny_hf_dir, shapes_dir)
    start = compile_counters()
    # the default threads (this process's: a change of thread count would recompile every graph)
    assert main(train_argv(work, tmp_path / "save", 3, "--use-torch-compile")) == 0
    out = capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "save" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("compiling", False) for r in rows] == [True, False, False]
    assert all(0 <= r["data_wait_s"] < r["step_time_s"] for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "intra-op thread" in out and "0 loader workers per rank" in out and "compiling:" in out
    assert "data wait" in out
    compiled = _delta(compile_counters(), start)
    assert compiled["graph_breaks"] == 0 and compiled["frames_compiled"] <= 3, compiled  # at most one per block kind


def test_lora_model_compiles_without_graph_break(eager_model):
    """LoRA (train/lora.apply_lora, all-linear + the routed experts' per-expert adapters) composed with
    per-block compile: the adapters' grouped low-rank update (ops/lora.grouped_lowrank: two grouped matmuls
    over the sorted rows) traces whole, so no block breaks its graph; loss and adapter gradients equal eager within fp32 tolerance."""
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.lora import LoRAConfig, apply_lora

    eager = copy.deepcopy(eager_model)
    apply_lora(eager, LoRAConfig(r=4, alpha=8.0), FreezeSpec())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # B != 0 (as after training), so every adapter moves the loss and has a gradient
        for name, p in eager.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    compiled = copy.deepcopy(eager)
    start = compile_counters()
    # one MoE layer (LoRALinear in attention and the shared experts, LoRA on the routed experts): tracing a
    # block costs ~20 s here, and the other layers are the same code
    graphs = []
    compile_block(compiled.model.language_model.layers[1], backend=_aot_eager_keeping_graphs(graphs))
    b = BATCHES[0]
    loss_c, grads_c = _loss_and_grads(compiled, b)
    loss_e, grads_e = _loss_and_grads(eager, b)
    compiled_now = _delta(compile_counters(), start)
    assert compiled_now["graph_breaks"] == 0 and compiled_now["graphs"] == 1, compiled_now  # traced whole
    _assert_aot_cacheable(graphs)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-6)
    adapters = [n for n in grads_e if "lora_" in n]
    assert grads_c.keys() == grads_e.keys() and set(grads_e) == set(adapters)
    assert any("experts.gate_up_proj_lora_A" in n for n in adapters) and any("q_proj.lora_B" in n for n in adapters)
    for name in adapters:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-5, atol=1e-6, msg=name)


def test_expert_loop_runs_eagerly_inside_a_compiled_block():
    """model.json use_npu_fused_moe false (`GroupedExperts.use_grouped_mm` off: a loop over the experts, whose
    shapes come from the counts' values) under compile: the loop runs eagerly inside the compiled experts
    (graph breaks, that setting only) and the numbers are eager's, forward and backward."""
    from mmtune.ops.moe import GroupedExperts

    torch.manual_seed(0)
    experts = GroupedExperts(4, 16, 8)
    torch.nn.init.normal_(experts.gate_up_proj, std=0.1)
    torch.nn.init.normal_(experts.down_proj, std=0.1)
    experts.use_grouped_mm = False
    compiled = compile_block(copy.deepcopy(experts), backend="aot_eager")
    x, w, e = torch.randn(10, 16), torch.rand(10, 2), torch.randint(0, 4, (10, 2))
    start = compile_counters()
    outs = []
    for block in (compiled, experts):
        x_in = x.clone().requires_grad_()
        y = block(x_in, w, e)
        y.square().sum().backward()
        outs.append((y.detach(), x_in.grad, block.gate_up_proj.grad))
    assert _delta(compile_counters(), start)["graph_breaks"] > 0  # the loop ran, eagerly
    for got, want in zip(*outs):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
