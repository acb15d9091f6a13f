"""bench/gpu_train.py cannot measure here (no GPU); its --dry-run (CPU, tiny config, the same code paths with
gloo and fp32, the compiled mode traced by aot_eager) runs every mode, and each mode's first loss equals
transformers' on the same weights and batch. Two invocations in this process: GLM-4.5V with every mode
(and the loss-memory and checkpoint-save sections), and the dense GLM-4.1V with a budget that stops after
its first mode. (The 2-rank context-parallel dry run is in test_context_parallel.py, the 4-rank expert-
parallel one in test_expert_parallel.py.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest


def _run(bench, monkeypatch, out: Path, argv: list[str]) -> dict:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # restored after the test; the bench sets the rest
    monkeypatch.setenv("OUT", str(out))
    assert bench.main(argv) == 0
    return json.loads((out / "gpu_train.json").read_text())


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def moe(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_train_moe")
    with pytest.MonkeyPatch.context() as mp:
        res = _run(bench, mp, out, ["--dry-run"])
    return res, out


def test_every_mode_runs_and_matches_transformers(bench, moe):
    res, out = moe
    assert list(res["modes"]) == [m.name for m in bench.MODES] and res["arch"] == "glm4v_moe"
    eager = res["modes"]["eager"]
    for name, m in res["modes"].items():
        assert "error" not in m and "skipped" not in m, (name, m)
        hf = res["hf"][m["seq_key"]]
        assert m["backend"] == "gloo" and m["step_s"] > 0 and m["tokens_per_s"] > 0 and "ratio_vs_hf" in m
        assert m["wall_s"] > 0
        assert abs(m["first_loss"] - hf["first_loss"]) < 1e-4 * hf["first_loss"], (name, m, hf)
        if name != "eager" and m["seq_key"] == eager["seq_key"]:
            assert "vs_eager" in m, name
    assert eager["trainable_params"] == res["hf"][eager["seq_key"]]["trainable_params"]  # the same frozen tower
    ep = res["modes"]["ep"]
    assert ep["expert_parallel_size"] == 1 and eager["expert_parallel_size"] == 0  # one rank: the dispatch path
    compiled = res["modes"]["compiled"]["compile"]
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] >= 2, compiled
    assert res["modes"]["compiled"]["compile_after_timing"] == compiled  # FSDP2's hooks and steps: no recompile
    assert res["modes"]["long"]["seq_key"] == f"1x{res['long_seq']}" != eager["seq_key"]
    rows = [line for line in (out / "gpu_train.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(res["modes"])  # the header and one row per mode
    assert res["paths"] == {"grouped_mm": True, "varlen_flash": False}  # the CPU has grouped_mm; varlen is CUDA's


def test_lora_mode_trains_only_adapters_from_the_base_model(moe):
    """LoRA as training applies it: adapters on the decoder's Linears and routed experts, the rest frozen;
    B = 0 at the start, so the first loss is the base model's (the eager mode's, on the same weights)."""
    res, _ = moe
    lora, eager = res["modes"]["lora"], res["modes"]["eager"]
    assert lora["lora"]["r"] == 16 and lora["lora"]["adapted_modules"] > 0
    assert 0 < lora["trainable_params"] < eager["trainable_params"]  # adapters only, not the full model
    assert lora["params"] == eager["params"] + lora["trainable_params"]  # the base plus its adapters
    assert abs(lora["first_loss"] - eager["first_loss"]) <= 1e-6 * eager["first_loss"]


def test_offload_mode_keeps_parameters_on_the_host(moe):
    res, _ = moe
    offload, eager = res["modes"]["offload"], res["modes"]["eager"]
    assert offload["fsdp_offload_to_cpu"] is True and eager["fsdp_offload_to_cpu"] is False
    assert abs(offload["first_loss"] - eager["first_loss"]) <= 1e-6 * eager["first_loss"]


def test_loss_memory_and_checkpoint_save_sections(moe):
    res, out = moe
    lm = res["loss_memory"]
    # chunked == plain up to bf16 rounding; no fp32-out addmm on the CPU (its peak memory is measured on CUDA)
    assert abs(lm["loss_chunk_value"] - lm["loss_default_value"]) < 1e-2 * lm["loss_default_value"]
    assert lm["loss_chunked_fp32_out_addmm"] is False
    saves = res["saves"]  # the dry run saves the eager mode's state into a temp dir
    assert "skipped" not in saves and "error" not in saves, saves
    assert saves["state_gb"] > 0 and saves["save_sync_blocked_s"] > 0 and saves["save_async_blocked_s"] > 0
    assert saves["save_async_total_s"] >= saves["save_async_blocked_s"]
    assert "checkpoint save of the eager mode's model" in (out / "gpu_train.md").read_text()


def test_dense_arch_and_the_budget_guard(bench, monkeypatch, tmp_path):
    """--arch glm4v (the dense GLM-4.1V through the models registry, next to transformers' Glm4v): the ep
    mode is skipped for want of experts; with a tiny --budget-s the first mode runs and the next is skipped."""
    res = _run(bench, monkeypatch, tmp_path, ["--dry-run", "--arch", "glm4v", "--modes", "eager,ep,lora",
                                              "--budget-s", "0.01"])
    eager, ep, lora = (res["modes"][k] for k in ("eager", "ep", "lora"))
    hf = res["hf"][eager["seq_key"]]
    assert res["arch"] == "glm4v" and "layers" in res and "moe_layers" not in res
    assert "error" not in eager and eager["step_s"] > 0
    assert abs(eager["first_loss"] - hf["first_loss"]) < 1e-4 * hf["first_loss"]
    assert ep["skipped"] == "skipped: dense model has no experts"
    assert lora["skipped"].startswith("skipped: budget") and "first_loss" not in lora
    assert "moe_load_max_mean" not in eager  # no router
    rows = (tmp_path / "gpu_train.md").read_text()
    assert "skipped: dense model has no experts" in rows and "skipped: budget" in rows
