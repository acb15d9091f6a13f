"""video.py against transformers' GLM-4V video processors: frame indices, metadata, decoded frames,
grids, timestamps and pixels on generated videos of several lengths, frame rates and sizes."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
from hf_video import (glm46v_video_processor_class, glm4v_video_processor_class, real_torchvision, video_structure,
                      with_tvf_stand_in)

from mmtune.data.video import VideoMeta, VideoProcessor, decode_frames, probe_video, sample_indices, write_video

# (frames, fps, width, height): odd and even counts, 1 frame, fractional fps, non-square, upscaled
FILES = {"a": (25, 10, 56, 56), "b": (7, 3, 64, 48), "c": (1, 5, 56, 56), "d": (31, 12.5, 40, 90)}


def _frames(n, w, h, seed):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    out = []
    for i in range(n):  # a moving bar over smooth content, so frames differ
        f = np.kron(base, np.ones((8, 8, 1), np.uint8))[:h, :w].copy()
        f[:, (3 * i) % w: (3 * i) % w + 4] = 255
        out.append(f)
    return out


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {k: write_video(d / f"{k}.mp4", _frames(n, w, h, i), fps) for i, (k, (n, fps, w, h)) in enumerate(FILES.items())}


def _hf_meta(meta: VideoMeta):
    from transformers.video_utils import VideoMetadata

    return VideoMetadata(total_num_frames=meta.total_frames, fps=meta.fps, duration=meta.duration,
                         width=meta.width, height=meta.height)


METAS = [(1, 30.0), (7, 3.0), (25, 10.0), (61, 24.0), (300, 29.97), (900, 30.0), (9000, 25.0), (9001, 30.0),
         (20000, 24.0), (80000, 30.0), (3, 0.5)]


@pytest.mark.parametrize("fps", [2.0, 1.0, 0.7])
def test_frame_indices_equal_transformers(fps):
    glm4v, glm46v = glm4v_video_processor_class(), glm46v_video_processor_class()
    me = types.SimpleNamespace(fps=2, max_duration=300, temporal_patch_size=2)
    for total, src_fps in METAS:
        meta = VideoMeta(total, src_fps, 56, 56, total / src_fps)
        ref = glm4v.sample_frames(me, _hf_meta(meta), fps=fps).tolist()
        assert sample_indices(meta, "glm4v", fps=fps, max_duration=300) == ref, (total, src_fps, fps)
        ref46 = glm46v.sample_frames(me, _hf_meta(meta)).tolist()  # GLM-4.6V ignores the fps argument
        assert sample_indices(meta, "glm46v", fps=fps, max_duration=300) == ref46, (total, src_fps)


def test_maxlen_thins_uniformly_to_an_even_count():
    meta = VideoMeta(600, 30.0, 56, 56, 20.0)  # 40 frames at fps 2
    full = sample_indices(meta, "glm4v", fps=2, max_duration=300)
    assert len(full) == 40
    for cap, want in ((64, 40), (16, 16), (15, 14), (1, 2)):
        got = sample_indices(meta, "glm4v", fps=2, max_duration=300, maxlen=cap)
        assert len(got) == want and set(got) <= set(full) and got == sorted(got)
        assert got[0] == full[0] and (want == 2 or got[-1] == full[-1])


def test_metadata_and_frames_equal_transformers_pyav_reader(videos):
    from transformers.video_utils import read_video_pyav

    glm4v = glm4v_video_processor_class()
    me = types.SimpleNamespace(fps=2, max_duration=300, temporal_patch_size=2)
    proc = VideoProcessor()
    for name, path in videos.items():
        ref_frames, ref_meta = read_video_pyav(str(path), lambda metadata, **kw: glm4v.sample_frames(me, metadata))
        meta = probe_video(path)
        assert (meta.total_frames, meta.fps, meta.duration, meta.width, meta.height) == (
            ref_meta.total_num_frames, ref_meta.fps, ref_meta.duration, ref_meta.width, ref_meta.height), name
        plan = proc.plan(meta)
        assert plan.indices == list(ref_meta.frames_indices), name
        frames = decode_frames(path, plan.indices)
        uniq = list(dict.fromkeys(plan.indices))  # transformers' PyAV reader keeps each decoded frame once
        assert np.array_equal(np.stack([frames[plan.indices.index(i)] for i in uniq]), ref_frames), name


@pytest.mark.parametrize("flavour", ["glm4v", "glm46v"])
def test_grid_timestamps_pixels_equal_transformers_processor(videos, flavour):
    """Pixels, grid and the `<|video|>` expansion against transformers' processor on the same decoded
    frames (its sampling included), with the CPU resize call torchvision makes standing in for it."""
    cls = glm46v_video_processor_class() if flavour == "glm46v" else glm4v_video_processor_class()
    size = {"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 30000}
    ours = VideoProcessor(flavour=flavour, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    for name, path in videos.items():
        meta = probe_video(path)
        all_frames = np.stack(decode_frames(path, list(range(meta.total_frames))))
        rows, plan = ours.process(path)
        with with_tvf_stand_in():
            ref = cls(size=size)(videos=[all_frames], video_metadata=[_hf_meta(meta)], return_metadata=True,
                                 return_tensors="np")
        assert plan.grid == tuple(ref["video_grid_thw"][0].tolist()), (name, flavour)
        assert rows.dtype == np.float32 and np.array_equal(rows, ref["pixel_values_videos"]), (name, flavour)
        assert list(ref["video_metadata"][0].frames_indices) == plan.indices
        text = video_structure(flavour, plan.grid, ref["video_metadata"][0])
        n = ours.frame_tokens(plan.grid)
        assert text == "".join(f"<|begin_of_image|>{'<|image|>' * n}<|end_of_image|>{t}" for t in plan.timestamps)


@pytest.mark.skipif(not real_torchvision(), reason="LOUD SKIP: torchvision does not import beside this torch "
                    "(the registry's wheels are CUDA builds), so pixel parity against transformers' real "
                    "torchvision resize is not checked here; test_grid_timestamps_pixels_equal_transformers_processor "
                    "checks everything else with the CPU resize call torchvision makes")
def test_pixels_equal_real_torchvision_path(videos):
    cls = glm4v_video_processor_class()
    for path in videos.values():
        meta = probe_video(path)
        frames = np.stack(decode_frames(path, list(range(meta.total_frames))))
        rows, plan = VideoProcessor(min_pixels=12544).process(path)
        ref = cls(size={"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 30000})(
            videos=[frames], video_metadata=[_hf_meta(meta)], return_tensors="np")
        assert np.array_equal(rows, ref["pixel_values_videos"]) and plan.grid == tuple(ref["video_grid_thw"][0])


def test_budget_counts_frames_and_pre_resize(videos):
    meta = VideoMeta(400, 10.0, 640, 480, 40.0)  # 80 frames at fps 2
    small = VideoProcessor(max_pixels=28 * 28 * 2 * 300)
    t, h, w = small.plan(meta).grid
    assert t == 40 and 2 * t * h * w * 14 * 14 <= 28 * 28 * 2 * 300 * 1.0 + 1  # T*H*W within the budget
    capped = VideoProcessor(max_pixels=28 * 28 * 2 * 300, maxlen=8).plan(meta)
    assert capped.grid[0] == 4 and capped.grid[1] * capped.grid[2] > h * w  # fewer frames, bigger frames
    pre = VideoProcessor(pre_max_pixels=32 * 32, min_pixels=28 * 28 * 2)  # video_max_pixels: per frame, H*W
    rows, plan = pre.process(videos["b"])  # 64x48 -> 36x27 -> 28x28
    assert plan.size == (28, 28) and rows.shape == (plan.grid[0] * plan.grid[1] * plan.grid[2], 1176)
    assert VideoProcessor(min_pixels=28 * 28 * 2).plan(probe_video(videos["b"])).size == (56, 56)


def test_from_pretrained_reads_flavour_and_sizes(tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": 1, "longest_edge": 2}}))
    p = VideoProcessor.from_pretrained(tmp_path, video_fps=1.5, video_maxlen=8)
    assert (p.flavour, p.min_pixels, p.max_pixels, p.video_fps, p.maxlen) == ("glm4v", 1, 2, 1.5, 8)
    (tmp_path / "video_preprocessor_config.json").write_text(json.dumps(
        {"size": {"shortest_edge": 3, "longest_edge": 4}, "fps": 3, "video_processor_type": "Glm46VVideoProcessor"}))
    p = VideoProcessor.from_pretrained(tmp_path)
    assert (p.flavour, p.min_pixels, p.max_pixels, p.fps) == ("glm46v", 3, 4, 3)
    (tmp_path / "video_preprocessor_config.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"processor_class": "Glm46VProcessor"}))
    assert VideoProcessor.from_pretrained(tmp_path).flavour == "glm46v"
    with pytest.raises(FileNotFoundError, match="preprocessor_config"):
        VideoProcessor.from_pretrained(tmp_path / "nowhere")


def test_bad_videos_are_named(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 10)
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    for path in (garbage, empty):
        with pytest.raises(ValueError, match=path.name):
            probe_video(path)
    with pytest.raises(FileNotFoundError):
        probe_video(tmp_path / "missing.mp4")
