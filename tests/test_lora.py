"""LoRA layers and apply_lora on the tiny model: init leaves the logits exactly unchanged; gradients reach
only the adapters; expert LoRA through the grouped-matmul rows equals a per-expert loop and the dense-delta
formulation (fp64, and fp32 with torch's grouped_mm); target resolution and its errors; names."""

from __future__ import annotations

import math

import pytest
import torch

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
from mmtune.ops import moe
from mmtune.ops.lora import LoRAGroupedExperts, LoRALinear, lora_delta, wrap_experts
from mmtune.ops.moe import GroupedExperts
from mmtune.train.freeze import FreezeSpec
from mmtune.train.lora import LoRAConfig, apply_lora, init_adapters, merged_state_dict, resolve_targets, valid_targets
from test_model import config_a, image_sample

TRAIN_ALL = FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False)


def _model(seed=0):
    model = Glm4vMoeForConditionalGeneration(config_a())
    model.init_weights(seed)
    return model


def test_init_is_exactly_the_base_model_and_only_adapters_get_gradients():
    model = _model()
    ids, pix, grid = image_sample(model.config, [(1, 4, 4)], 10)
    with torch.no_grad():
        base = model(ids, pix, grid).logits
    base_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    info = apply_lora(model, LoRAConfig(r=4, dropout=0.1), TRAIN_ALL)
    init_adapters(model, seed=1)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids, pix, grid).logits, base)  # B = 0: bit-identical
    # base names unchanged; adapters trainable, everything else frozen
    params = dict(model.named_parameters())
    assert {n for n in params if "lora_" not in n} == set(base_params)
    assert {n for n, p in params.items() if p.requires_grad} == {n for n in params if "lora_" in n}
    assert info.trainable == sum(p.numel() for n, p in params.items() if "lora_" in n)
    model.train()
    model(ids, pix, grid).logits.float().pow(2).mean().backward()
    for n, p in params.items():
        if n.endswith("lora_B"):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
        elif n.endswith("lora_A"):  # B = 0: A's gradient B^T dy is exactly 0 at the first step
            assert p.grad is not None and not p.grad.any(), n
        else:
            assert p.grad is None, n
    for n, p in base_params.items():
        assert torch.equal(params[n], p), n


def test_adapter_init_is_seeded_per_name():
    a, b = _model(), _model()
    apply_lora(a, LoRAConfig(r=2, targets=("q_proj", "experts")), TRAIN_ALL)
    apply_lora(b, LoRAConfig(r=2, targets=("experts",)), TRAIN_ALL)
    init_adapters(a, 5)
    init_adapters(b, 5)
    name = "model.language_model.layers.1.mlp.experts.gate_up_proj_lora_A"
    assert torch.equal(dict(a.named_parameters())[name], dict(b.named_parameters())[name])
    assert dict(a.named_parameters())[name].abs().max() > 0


def _reference_loop(x_TH, weights_TK, experts_TK, experts: LoRAGroupedExperts):
    """Token by token, slot by slot: out = sum_k w_k (down_e + s B_d A_d)(silu(g) * u) with [g; u] =
    (gate_up_e + s B_gu A_gu) x — each expert's adapter applied to exactly its tokens."""
    out = torch.zeros_like(x_TH)
    s = experts.scale
    for t in range(x_TH.shape[0]):
        for k in range(experts_TK.shape[1]):
            e = int(experts_TK[t, k])
            x = x_TH[t]
            h = experts.gate_up_proj[e] @ x + s * experts.gate_up_proj_lora_B[e] @ (experts.gate_up_proj_lora_A[e] @ x)
            g, u = h.chunk(2)
            z = torch.nn.functional.silu(g) * u * weights_TK[t, k]
            out[t] += experts.down_proj[e] @ z + s * experts.down_proj_lora_B[e] @ (experts.down_proj_lora_A[e] @ z)
    return out


def _dense_delta(x_TH, weights_TK, experts_TK, experts: LoRAGroupedExperts):
    """The plain experts with merged weights W + s B A (what PEFT's target_parameters computes)."""
    plain = GroupedExperts(experts.num_experts, experts.gate_up_proj.shape[2], experts.down_proj.shape[2]).to(x_TH.dtype)
    with torch.no_grad():
        for p in ("gate_up_proj", "down_proj"):
            delta = lora_delta(getattr(experts, f"{p}_lora_A"), getattr(experts, f"{p}_lora_B"), experts.scale)
            getattr(plain, p).copy_(getattr(experts, p) + delta)
    return plain(x_TH, weights_TK, experts_TK)


@pytest.mark.parametrize("path", ["per_expert", "per_expert_2I<H", "per_expert_merged", "per_expert_factored", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_expert_lora_equals_loop_and_dense_delta(dtype, path, monkeypatch):
    """Both CPU paths of the experts' adapters (ops/lora: per expert, the eager CPU default; grouped, what
    CUDA and torch.compile run) against a token-by-token loop and the merged-weight form, outputs and the
    gradients of the input and of every adapter (the base frozen, as LoRA trains it). The per-expert path
    takes each expert through its merged weight or the factored products by its row count (more rows than
    In: merged in the forward and kept for the backward; else more than Out: merged in the backward only):
    by default here down_proj's forward merges some experts and factors one; with 2I < H gate_up_proj's
    backward merges some experts alone and factors others; then all merged, then all factored."""
    from mmtune.ops import lora as lora_ops

    monkeypatch.setattr(lora_ops, "PER_EXPERT_ON_CPU", path.startswith("per_expert"))
    monkeypatch.setattr(lora_ops, "MERGE_ROWS", {"per_expert_merged": 0.0, "per_expert_factored": math.inf}.get(
        path, lora_ops.MERGE_ROWS))
    g = torch.Generator().manual_seed(0)
    E, H, I, T, K, r = 5, 16, 5 if path == "per_expert_2I<H" else 8, 23, 2, 4
    base = GroupedExperts(E, H, I).to(dtype)
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * 0.3)
    base.requires_grad_(False)
    experts = wrap_experts(base, r=r, alpha=2.0 * r)
    for n, p in experts.named_parameters():
        if "lora_" in n:  # adapters are made in fp32: in the base's dtype here
            p.data = torch.randn(p.shape, generator=g, dtype=dtype) * 0.3
    x = torch.randn(T, H, generator=g, dtype=dtype, requires_grad=True)
    experts_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    experts_TK[:, :] = experts_TK.clamp(max=E - 2)  # expert E-1 gets no rows: empty groups are handled
    experts_TK[:, 1] = (experts_TK[:, 0] + 1) % (E - 1)
    w = torch.rand(T, K, generator=g, dtype=dtype)
    rows = torch.bincount(experts_TK.flatten(), minlength=E)[:-1]
    if path == "per_expert":  # down_proj (In = I, Out = H): its forward merges some experts, not all
        assert rows.min() <= I < rows.max() <= H
    if path == "per_expert_2I<H":  # gate_up_proj (In = H, Out = 2I): some merged in the backward only, some not
        assert rows.min() <= 2 * I < rows.max() <= H and rows.min() > I  # down_proj: all merged
    proj = experts.projection("gate_up_proj")
    assert lora_ops._per_expert_ok(x, proj) == path.startswith("per_expert")
    if dtype == torch.float32 and path == "grouped":  # torch's grouped matmul runs (it has no fp64 kernel on the CPU)
        assert moe._grouped_mm_ok(x, experts.gate_up_proj) and moe._grouped_mm_ok(torch.zeros(3, r), experts.down_proj_lora_B)
    got = experts(x, w, experts_TK)
    got.pow(2).sum().backward()
    adapters = {n: p for n, p in experts.named_parameters() if "lora_" in n}
    grads = {"x": x.grad, **{n: p.grad for n, p in adapters.items()}}

    x64 = x.detach().double().requires_grad_()
    ref64 = {n: p.detach().double().requires_grad_() for n, p in adapters.items()}
    with torch.no_grad():
        ref = _reference_loop(x64, w.double(), experts_TK, _with(experts, ref64))
    plain = GroupedExperts(E, H, I).double()
    for p in ("gate_up_proj", "down_proj"):  # W + s B A with A, B leaves: autograd gives their gradients
        delattr(plain, p)
        setattr(plain, p, getattr(experts, p).detach().double()
                + lora_delta(ref64[f"{p}_lora_A"], ref64[f"{p}_lora_B"], experts.scale))
    dense = plain(x64, w.double(), experts_TK)
    dense.pow(2).sum().backward()
    tol = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=2e-5)
    torch.testing.assert_close(dense.detach(), ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(got.detach().double(), ref, **tol)
    want = {"x": x64.grad, **{n: t.grad for n, t in ref64.items()}}
    grad_tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else tol  # gradients reach ~1e3
    for n in want:
        torch.testing.assert_close(grads[n].double(), want[n], **grad_tol, msg=lambda m, n=n: f"{n}: {m}")
    assert grads["down_proj_lora_A"][E - 1].abs().sum() == 0  # the expert without rows


def _with(experts: LoRAGroupedExperts, adapters: dict) -> LoRAGroupedExperts:
    """A float64 copy of `experts` with the given adapter tensors."""
    copy = wrap_experts(GroupedExperts(experts.num_experts, experts.gate_up_proj.shape[2],
                                       experts.down_proj.shape[2]).double(), r=experts.r, alpha=experts.scale * experts.r)
    with torch.no_grad():
        copy.gate_up_proj.copy_(experts.gate_up_proj)
        copy.down_proj.copy_(experts.down_proj)
    for n, t in adapters.items():
        delattr(copy, n)
        setattr(copy, n, t)
    return copy


def test_merged_state_dict_gives_the_lora_logits():
    model = _model()
    apply_lora(model, LoRAConfig(r=4, alpha=8), TRAIN_ALL)
    init_adapters(model, 0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.normal_(0, 0.05)
    model.eval()
    plain = Glm4vMoeForConditionalGeneration(model.config).eval()
    plain.load_state_dict(merged_state_dict(model))
    ids, pix, grid = image_sample(model.config, [(1, 4, 4)], 10)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids, pix, grid).logits, model(ids, pix, grid).logits, rtol=0, atol=1e-5)


def test_targets_names_and_errors():
    model = _model()
    assert valid_targets(model) == ["down_proj", "experts", "gate_proj", "k_proj", "o_proj", "proj", "q_proj", "qkv",
                                    "shared_experts", "up_proj", "v_proj", "all-linear"]
    recipe = FreezeSpec()  # vision encoder and projector frozen: adapters only in the text decoder
    chosen = resolve_targets(model, LoRAConfig(r=2), recipe)
    assert all(n.startswith("model.language_model.") for n in chosen)
    assert chosen["model.language_model.layers.1.mlp.experts"] == "experts"
    assert not any(n.endswith(".gate") for n in chosen)  # the router, never
    assert "model.language_model.layers.0.mlp.gate_proj" in chosen and "lm_head" not in chosen
    shared = resolve_targets(model, LoRAConfig(r=2, targets=("shared_experts",)), recipe)
    assert sorted(shared) == [f"model.language_model.layers.{i}.mlp.shared_experts.{p}"
                              for i in (1, 2) for p in ("down_proj", "gate_proj", "up_proj")]
    assert len(resolve_targets(model, LoRAConfig(r=2, targets=("qkv",)), TRAIN_ALL)) == 2
    with pytest.raises(ValueError, match="no module of this model has that name; valid: down_proj experts"):
        resolve_targets(model, LoRAConfig(r=2, targets=("q_prj",)), recipe)
    with pytest.raises(ValueError, match="the MoE router"):
        resolve_targets(model, LoRAConfig(r=2, targets=("gate",)), recipe)
    with pytest.raises(ValueError, match="lm head"):
        resolve_targets(model, LoRAConfig(r=2, targets=("lm_head",)), recipe)
    with pytest.raises(ValueError, match=r"image_encoder.vision_encoder.freeze true"):
        resolve_targets(model, LoRAConfig(r=2, targets=("qkv",)), recipe)
    with pytest.raises(ValueError, match="--lora-r must be an integer >= 1"):
        LoRAConfig(r=0)
    with pytest.raises(ValueError, match="--lora-dropout"):
        LoRAConfig(r=2, dropout=1.0)
    # the module swap keeps the base Parameter objects
    q = model.model.language_model.layers[0].self_attn.q_proj
    apply_lora(model, LoRAConfig(r=2, targets=("q_proj",)), recipe)
    new = model.model.language_model.layers[0].self_attn.q_proj
    assert isinstance(new, LoRALinear) and new.weight is q.weight and new.bias is q.bias
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        apply_lora(model, LoRAConfig(r=2, targets=("q_proj",)), recipe)


def test_build_on_meta_keeps_frozen_base_in_the_compute_dtype():
    from mmtune.distributed.parallelize import store_frozen_in

    with torch.device("meta"):
        model = Glm4vMoeForConditionalGeneration(config_a())
    apply_lora(model, LoRAConfig(r=2), FreezeSpec())
    assert store_frozen_in(model, torch.bfloat16) > 0
    for n, p in model.named_parameters():
        if "lora_" in n or "mlp.gate." in n:  # adapters train in fp32; the routers compute in fp32
            assert p.dtype == torch.float32, n
        else:
            assert p.dtype == torch.bfloat16 and not p.requires_grad, n
