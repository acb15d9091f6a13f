"""tools.json profiling (torch.profiler traces on chosen ranks/steps) and the metrics logger."""

from __future__ import annotations

import json

import pytest
import torch

from mmtune.train.metrics import MetricsLogger, StepStats, text_flops_per_token
from mmtune.train.profiling import Profiler, load_tools_json


def test_tools_json_profiles_the_chosen_steps(tmp_path):
    tools = {"profile": {"enable": True, "profile_type": "static", "ranks": [0],
                         "static_param": {"start_step": 2, "end_step": 4, "save_path": str(tmp_path / "prof"),
                                          "record_shapes": True, "level": "level1", "aic_metrics_type": "x"}},
             "memory_snapshot": {"enable": True, "ranks": [0], "start_step": 1, "stop_step": 2,
                                 "save_path": str(tmp_path / "snap")}}
    path = tmp_path / "tools.json"
    path.write_text(json.dumps(tools))
    cfg = load_tools_json(path)
    other = Profiler(cfg, rank=1, device=torch.device("cpu"), print_fn=lambda *a, **k: None)
    assert not other.profiling
    prof = Profiler(cfg, rank=0, device=torch.device("cpu"), print_fn=lambda *a, **k: None)
    assert prof.profiling and not prof.snapshot  # memory snapshots are CUDA-only
    x = torch.randn(64, 64)
    for step in range(1, 6):
        prof.step_begin(step)
        with torch.profiler.record_function(f"train_step_{step}"):
            x = (x @ x).tanh()
        prof.step_end(step)
    prof.close()
    (trace,) = prof.written
    assert trace.name == "rank0_step2-3.pt.trace.json"
    text = trace.read_text()
    assert "train_step_2" in text and "train_step_3" in text and "train_step_4" not in text

    tools["profile"]["static_param"]["strat_step"] = 1
    path.write_text(json.dumps(tools))
    with pytest.raises(ValueError, match="strat_step"):
        load_tools_json(path)


def test_metrics_jsonl_tensorboard_and_resume_truncation(tmp_path):
    from mmtune.models.glm4v_moe import tiny_config

    lines = []
    m = MetricsLogger(metrics_file=tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb", train_iters=4,
                      flops_per_token=text_flops_per_token(tiny_config().text, 96), device=torch.device("cpu"),
                      world_size=2, enabled=True, print_fn=lambda s, **k: lines.append(s))
    m.peak = 1e12  # as if on a GPU with a known peak: MFU is reported
    for step in range(1, 5):
        m.record(StepStats(step, 2.0 / step, 1e-3, 0.5, 0.25, tokens=1000, samples=8), log=step % 2 == 0)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["tokens_per_s"] == 4000 and rows[0]["samples_per_s"] == 32
    assert rows[0]["mfu"] == pytest.approx(4000 * m.flops_per_token / 2e12)
    assert "loss 1" in lines[0] and "tokens/s 4.00k" in lines[0] and "mfu" in lines[0] and "eta" in lines[0]
    summary = m.summary()
    assert summary["steps"] == 3 and summary["tokens_per_s"] == pytest.approx(4000)
    m.close()
    assert list((tmp_path / "tb").glob("events.*"))
    m.truncate_after(3)
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]
