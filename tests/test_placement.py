"""`mmtune generate --device cuda` on a model larger than one GPU (mmtune/placement.py): the decision (one GPU,
the layers over several, or a refusal that names the memory) from fake free-memory figures, and the placed
model (hooks moving inputs between units) generating exactly like the plain one, on the CPU."""

from __future__ import annotations

import pytest
import torch

from mmtune import generate as G
from mmtune import placement as P
from mmtune.models.glm4v_moe.config import glm45v_config

GiB = P.GiB


def _budget(free_gib: float) -> float:
    return free_gib * P.HEADROOM - P.RESERVE_GIB


def test_glm45v_bf16_goes_over_three_80gb_gpus_and_is_refused_on_two():
    devices = G.cuda_devices(glm45v_config(), torch.bfloat16, free=[80 * GiB] * 8)
    from mmtune.plan import build_meta_model

    meta = build_meta_model(glm45v_config())
    G._cast(meta, torch.bfloat16)
    sizes = P.unit_bytes(meta)
    assert 195 * GiB < sum(sizes) < 205 * GiB  # ~108B parameters in bf16 (routers fp32)
    gpus = [int(d.split(":")[1]) for d in devices]
    assert gpus[0] == 0 and gpus == sorted(gpus) and set(gpus) == {0, 1, 2}  # in order, 3 of the 8
    for g in set(gpus):
        assert sum(s for s, x in zip(sizes, gpus) if x == g) <= _budget(80) * GiB
    with pytest.raises(ValueError, match=r"needs 20\d\.\d GiB .* 2 visible GPU\(s\) have 80\.0, 80\.0 GiB free.*"
                                         r"--device cpu.*tensor-parallel"):
        G.cuda_devices(glm45v_config(), torch.bfloat16, free=[80 * GiB] * 2)
    with pytest.raises(ValueError, match=r"0 visible GPU\(s\) have none GiB free"):
        P.plan_devices(sizes, [])


def test_a_model_that_fits_stays_on_one_gpu_and_units_are_never_split():
    assert P.plan_devices([GiB] * 10, [40 * GiB, 40 * GiB]) == [0] * 10
    # 30 GiB of budget per GPU: 10 units of 7 GiB -> 4, 4, 2 (a unit never straddles two GPUs)
    assert P.plan_devices([7 * GiB] * 10, [int((30 + P.RESERVE_GIB) / P.HEADROOM * GiB) + 1] * 3) == [0] * 4 + [1] * 4 + [2] * 2
    with pytest.raises(ValueError, match="needs 40.0 GiB"):
        P.plan_devices([20 * GiB, 20 * GiB], [16 * GiB] * 8)  # each unit larger than any one GPU's budget


def test_inputs_follow_each_unit():
    from mmtune.ops.attention import AttentionMask

    mask = AttentionMask(True, cu_seqlens=torch.tensor([0, 3, 5], dtype=torch.int32), lengths=[3, 2], max_seqlen=3)
    moved = P._to(((torch.ones(2), torch.zeros(2)), mask, None), torch.device("meta"))
    assert moved[0][0].is_meta and moved[1].cu_seqlens.is_meta and moved[1].lengths == [3, 2] and moved[2] is None
    assert mask.cu_seqlens.device.type == "cpu"  # the original is untouched


def test_placed_model_generates_like_the_plain_one(tiny_hf_dir, tmp_path, monkeypatch):
    """The multi-GPU load paths (HF dir: meta -> each unit materialised where it goes; DCP: loaded, then moved)
    run on the CPU with two distinct names of it standing in for two GPUs."""
    from mmtune.convert.hf_to_dcp import hf_to_dcp

    plain, hf = G.load_model(tiny_hf_dir)
    tok = G.load_tokenizer(hf)
    n = len(P.units_of(plain))
    split = ["cpu"] * (n // 2) + ["cpu:0"] * (n - n // 2)
    monkeypatch.setattr(G, "cuda_devices", lambda config, dtype, free=None: split)
    hf_to_dcp(tiny_hf_dir, tmp_path / "dcp", progress=False)
    prompt = "Name the shape in: a blue square."
    ref = G.generate(plain, tok, prompt, max_new_tokens=6).token_ids
    requests = [(prompt, []), ("What shape is this?", [])]
    ref_batch = [g.token_ids for g in G.generate_batch(plain, tok, requests, max_new_tokens=4)]
    for model in (G.load_model(tiny_hf_dir, device="cuda")[0], G.load_model(tmp_path / "dcp", hf_dir=tiny_hf_dir,
                                                                            device="cuda")[0]):
        hooked = [m for m in model.modules() if m._forward_pre_hooks]
        assert len(hooked) == n + 2  # front and back units hold two modules each
        assert G.generate(model, tok, prompt, max_new_tokens=6).token_ids == ref
        assert [g.token_ids for g in G.generate_batch(model, tok, requests, max_new_tokens=4)] == ref_batch
    assert P.describe(split, [u for u, _ in P.units_of(plain)]).startswith("cpu: vision tower + embedding .. decoder")
