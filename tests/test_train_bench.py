"""bench/gpu_train.py cannot run here (no GPU); its --dry-run (CPU, tiny config, the same code path with
gloo and fp32) must run, and both models must give the same first loss on the same weights."""

from __future__ import annotations

import importlib.util
from pathlib import Path


import pytest


@pytest.mark.parametrize("arch", ["glm4v_moe", "glm4v"])
def test_gpu_train_bench_dry_run(arch, monkeypatch, tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # restored after the test; the bench sets the rest
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--dry-run", "--arch", arch]) == 0
    import json

    res = json.loads((tmp_path / "gpu_train.json").read_text())
    assert res["backend"] == "gloo" and res["mmtune_step_s"] > 0 and res["hf_missing_keys"] == 0 and res["arch"] == arch
    assert abs(res["mmtune_first_loss"] - res["hf_first_loss"]) < 1e-4 * res["hf_first_loss"]
    # the bf16 loss-memory part ran (chunked == plain up to bf16 rounding; no fp32-out addmm on the CPU)
    assert abs(res["loss_chunk_value"] - res["loss_default_value"]) < 1e-2 * res["loss_default_value"]
    assert res["loss_chunked_fp32_out_addmm"] is False
    assert res["save_sync_blocked_s"] > 0 and res["save_async_blocked_s"] > 0  # --save-dir's timing runs
