"""Videos and tool calls end to end: mixed data (images, videos, text-only, LLaMA-Factory and OpenAI tool
conversations) through preprocessing, bad-sample handling, packing, and a 2-step `mmtune train`."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mmtune.data.config import parse_data_config
from mmtune.data.dataset import build_dataset
from mmtune.data.llava import llava_to_mllm
from mmtune.data.shapes import make_shapes, moving_frames, random_spec
from mmtune.data.video import write_video
from mmtune.models.glm4v_moe.rope import get_rope_index
from test_train_helpers import train_argv

TOOLS = [{"name": "measure", "description": "size of the shape", "parameters": {"type": "object"}}]


def _tool_samples() -> list[dict]:
    lf = {"messages": [
        {"role": "user", "content": "<image>How big is the shape?"},
        {"role": "function_call", "content": '{"name": "measure", "arguments": {"unit": "px"}}'},
        {"role": "observation", "content": '{"radius": 18}'},
        {"role": "assistant", "content": "It is big."}], "images": ["images/000001.png"], "tools": json.dumps(TOOLS)}
    openai = {"messages": [
        {"role": "user", "content": "Measure twice."},
        {"role": "assistant", "content": None, "reasoning_content": "two calls", "tool_calls": [
            {"type": "function", "function": {"name": "measure", "arguments": '{"unit": "px"}'}},
            {"type": "function", "function": {"name": "measure", "arguments": {"unit": "cm"}}}]},
        {"role": "tool", "content": "18"}, {"role": "tool", "content": "0.5"},
        {"role": "assistant", "content": "<think>same</think>18 px, 0.5 cm."}], "tools": TOOLS}
    return [lf, openai]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_hf_dir):
    """A data dir with 8 image/text + 4 video shapes samples, 2 tool samples and 4 bad ones; data.json."""
    d = tmp_path_factory.mktemp("mixed")
    make_shapes(d, num=8, seed=3, videos=4)
    llava_to_mllm(d / "llava_format.json", d / "mllm.json")
    samples = json.loads((d / "mllm.json").read_text()) + _tool_samples()
    (d / "videos" / "garbage.mp4").write_bytes(b"\x00" * 64)
    write_video(d / "videos" / "long.mp4", moving_frames(random_spec(random.Random(0)), "left", 130), 2)
    bad = [
        {"messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}], "videos": ["videos/garbage.mp4"]},
        {"messages": [{"role": "user", "content": "<video><video>?"}, {"role": "assistant", "content": "x"}], "videos": ["videos/000000.mp4"]},
        {"messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}], "videos": ["videos/long.mp4"]},
        {"messages": [{"role": "user", "content": "<video>?"}, {"role": "assistant", "content": "x"}], "videos": ["videos/none.mp4"]},
    ]
    (d / "mixed.json").write_text(json.dumps(samples + bad))
    text_only = {"messages": [{"role": "user", "content": "Name the color in: a red circle."},
                              {"role": "assistant", "content": "red"}]}
    images = [s for s in samples if s.get("images") and "tools" not in s][:2]
    videos = [s for s in samples if s.get("videos")][:2]
    (d / "train_mix.json").write_text(json.dumps(images + videos + [text_only] + _tool_samples()))
    raw = {"dataset_param": {
        "preprocess_parameters": {"model_name_or_path": str(tiny_hf_dir)},
        "basic_parameters": {"dataset_dir": str(d), "dataset": "mixed.json", "tool_format": "glm4_moe",
                             "enable_thinking": False, "packing": True, "cache_dir": None},
    }, "dataloader_param": {"num_workers": 0}}
    (d / "data.json").write_text(json.dumps(raw))
    return d, raw


def test_mixed_preprocessing_and_bad_samples(mixed, tiny_hf_dir):
    d, raw = mixed
    prepared = build_dataset(parse_data_config(raw), tiny_hf_dir, progress=False)
    reasons = dict(prepared.bad)
    assert len(prepared.good) == 14 and len(reasons) == 4, reasons
    assert "garbage.mp4" in reasons[f"{d / 'mixed.json'}:14"]
    assert "2 <video> tags for 1 videos" in reasons[f"{d / 'mixed.json'}:15"]
    assert "do not fit the video pixel budget" in reasons[f"{d / 'mixed.json'}:16"]
    assert "missing video file" in reasons[f"{d / 'mixed.json'}:17"]
    rows = [prepared.ds[i] for i in prepared.good]
    assert sum(1 for r in rows if r["videos"]) == 4 and all(r["video_grids"] == [[2, 4, 4]] for r in rows if r["videos"])
    assert all(r["video_frames"] == [[0, 2, 4, 6]] for r in rows if r["videos"])
    # tool samples need tool_format
    no_tools = json.loads(json.dumps(raw))
    no_tools["dataset_param"]["basic_parameters"]["tool_format"] = None
    prepared = build_dataset(parse_data_config(no_tools), tiny_hf_dir, progress=False)
    assert sum("tool_format" in r for _, r in prepared.bad) == 2


def test_packed_batches_keep_video_positions(mixed, tiny_hf_dir):
    from mmtune.data.loader import build_train_loader

    d, raw = mixed
    cfg = parse_data_config(raw)
    loader = build_train_loader(cfg, tokenizer_dir=tiny_hf_dir, seq_length=160, micro_batch_size=2, num_workers=0,
                                progress=False)
    ids = loader.dataset.mat.ids
    it, seen_video = iter(loader), 0
    for _ in range(len(loader.dataset) // 2):
        batch = next(it)
        flat_ids, flat_pos = batch["input_ids"].flatten(), batch["position_ids"].flatten(1)
        vgrids = batch.get("video_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        igrids = batch.get("image_grid_thw", torch.zeros(0, 3, dtype=torch.long))
        if "pixel_values_videos" in batch:
            seen_video += 1
            assert batch["pixel_values_videos"].shape == (int(vgrids.prod(-1).sum()), 1176)
        cu = batch["cu_seqlens"].tolist()
        vi = ii = 0
        for a, b in zip(cu[:-1], cu[1:]):  # each packed sample's positions are its own rope index
            seg = flat_ids[a:b]
            if (seg == ids.pad).all():
                continue
            n_vid = int((seg == ids.video_start).sum())
            n_img = int((seg == ids.image_start).sum()) - int(vgrids[vi:vi + n_vid, 0].sum())
            ref, _ = get_rope_index(seg, igrids[ii:ii + n_img] if n_img else None, vgrids[vi:vi + n_vid] if n_vid else None,
                                    image_token_id=ids.image, video_start_token_id=ids.video_start,
                                    video_end_token_id=ids.video_end)
            assert torch.equal(flat_pos[:, a:b], ref)
            vi, ii = vi + n_vid, ii + n_img
        assert vi == len(vgrids) and ii == len(igrids)
    assert seen_video


def test_two_training_steps_on_mixed_data(mixed, tmp_path, tiny_hf_dir):
    """2 steps of `mmtune train` on image, video, text-only and tool samples, all of them in the rows of
    the first step (2 packed rows of 512 tokens: the tool samples' tool lists are long)."""
    from mmtune.data.loader import build_train_loader
    from mmtune.train.cli import main

    d, raw = mixed
    raw = json.loads(json.dumps(raw))
    raw["dataset_param"]["basic_parameters"]["dataset"] = "train_mix.json"
    stats = build_train_loader(parse_data_config(raw), tokenizer_dir=tiny_hf_dir, seq_length=512, micro_batch_size=1,
                               num_workers=0, progress=False).pack_stats
    assert (stats.samples, stats.rows, stats.dropped_too_long) == (7, 2, 0), stats.summary()
    repo = Path(__file__).resolve().parents[1]
    model = json.loads((repo / "examples/tiny/model.json").read_text())
    model["init_from_hf_path"] = str(tiny_hf_dir)
    model["image_encoder"]["vision_encoder"]["freeze"] = True
    (tmp_path / "model.json").write_text(json.dumps(model))
    (tmp_path / "data.json").write_text(json.dumps(raw))
    argv = train_argv(tmp_path, tmp_path / "save", 2)
    for flag, value in (("--seq-length", "512"), ("--micro-batch-size", "1"), ("--global-batch-size", "2")):
        argv[argv.index(flag) + 1] = value
    assert main(argv) == 0
    metrics = [json.loads(line) for line in (tmp_path / "save" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2] and all(np.isfinite(m["loss"]) for m in metrics)
