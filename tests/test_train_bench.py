"""bench/gpu_train.py cannot measure here (no GPU); its --dry-run (CPU, tiny config, the same code paths with
gloo and fp32, the compiled mode traced by aot_eager) runs every mode the checkout has, and each mode's first
loss equals transformers' on the same weights and batch. (The 2-rank context-parallel dry run is in
test_context_parallel.py.)"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def test_gpu_train_bench_dry_run(monkeypatch, tmp_path):
    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_train.py"
    spec = importlib.util.spec_from_file_location("gpu_train_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")  # restored after the test; the bench sets the rest
    monkeypatch.setenv("OUT", str(tmp_path))
    assert bench.main(["--dry-run"]) == 0
    res = json.loads((tmp_path / "gpu_train.json").read_text())
    assert list(res["modes"]) == [m.name for m in bench.MODES]
    ran = {name: m for name, m in res["modes"].items() if "waiting" not in m}
    assert {"eager", "compiled", "ep", "long"} <= set(ran)  # the others wait for their features (named in the JSON)
    assert ran["ep"]["expert_parallel_size"] == 1 and "vs_eager" in ran["ep"]  # one rank: the dispatch path at EP=1
    for name, m in ran.items():
        assert "error" not in m, (name, m)
        hf = res["hf"][m["seq_key"]]
        assert m["backend"] == "gloo" and m["step_s"] > 0 and m["tokens_per_s"] > 0 and "ratio_vs_hf" in m
        assert abs(m["first_loss"] - hf["first_loss"]) < 1e-4 * hf["first_loss"], (name, m, hf)
    compiled = ran["compiled"]["compile"]
    assert compiled["graph_breaks"] == 0 and compiled["graphs"] >= 2, compiled
    assert ran["compiled"]["compile_after_timing"] == compiled  # FSDP2's hooks and steps: no recompile
    rows = [line for line in (tmp_path / "gpu_train.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(res["modes"])  # the header and one row per mode
    assert res["paths"] == {"grouped_mm": True, "varlen_flash": False}  # the CPU has grouped_mm; varlen is CUDA's
