"""make-shapes (deterministic, learnable format) and llava-to-mllm (byte-exact text, skips named)."""

from __future__ import annotations

import hashlib
import json

from PIL import Image

from mmtune.data.cli import main as data_main
from mmtune.data.llava import llava_to_mllm
from mmtune.data.shapes import COLORS, SHAPES, eval_questions, make_shapes
from mmtune.data.template import NOT_UTF8


def _digest(d):
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(p.relative_to(d).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def test_make_shapes_deterministic_and_well_formed(tmp_path):
    assert data_main(["make-shapes", "--out", str(tmp_path / "a"), "--num", "40", "--seed", "3"]) == 0
    make_shapes(tmp_path / "b", num=40, seed=3)
    make_shapes(tmp_path / "c", num=40, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")
    samples = json.loads((tmp_path / "a" / "llava_format.json").read_text())
    assert len(samples) == 40
    text_only = [s for s in samples if "image" not in s]
    assert 1 <= len(text_only) <= 12
    assert any(len(s["conversations"]) == 4 for s in samples)  # some multi-turn
    for s in samples:
        conv = s["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"] * (len(conv) // 2)
        answers = {t["value"] for t in conv[1::2]}
        assert answers <= set(COLORS) | set(SHAPES)
        if "image" in s:
            assert conv[0]["value"].startswith("<image>\n")
            img = Image.open(tmp_path / "a" / s["image"])
            assert img.size == (56, 56) and img.mode == "RGB"
        else:
            assert all("<image>" not in t["value"] for t in conv)
            assert conv[1]["value"] in conv[0]["value"]  # learnable from text
    ev = eval_questions(6, seed=0)
    assert len(ev) == 6 and all(isinstance(im, Image.Image) and a in q or a for im, q, a in ev)
    assert {a for _, _, a in ev} <= set(COLORS) | set(SHAPES)


def test_llava_to_mllm(tmp_path, capsys):
    imgs = tmp_path / "coco"
    (imgs / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(imgs / "sub" / "a.jpg")
    (tmp_path / "outside.jpg").write_bytes(b"x")
    llava = [
        {"id": "ok", "image": "sub/a.jpg", "conversations": [
            {"from": "human", "value": "<image>\nQuelle est la couleur ? 日本 🙂"}, {"from": "gpt", "value": "rouge\u00a0!"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "text only"}, {"from": "gpt", "value": "yes"}]},
        {"id": "noimg", "image": "", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
        {"id": "missing", "image": "sub/none.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
        {"id": "role", "conversations": [{"from": "robot", "value": "q"}]},
        {"id": "empty", "conversations": []},
        {"id": "escape", "image": "../outside.jpg", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]},
    ]
    src = tmp_path / "llava.json"
    src.write_text(json.dumps(llava, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "out" / "mllm.json"
    rc = data_main(["llava-to-mllm", "--input", str(src), "--output", str(out), "--image-dir", str(imgs)])
    assert rc == 0
    printed = capsys.readouterr()
    assert "kept 3 samples, skipped 4" in printed.out
    for name in ("id missing", "id role", "id empty", "id escape"):
        assert name in printed.err
    assert "image file missing" in printed.err and "unknown role" in printed.err and "escapes" in printed.err
    # the images lie beside out/, not in it: the written "../coco/..." paths are what training refuses by default
    assert f"note: 1 samples name images outside {out.parent} (written as ../...)" in printed.err
    assert "allow_absolute_image_paths: true" in printed.err
    res = json.loads(out.read_text(encoding="utf-8"))
    assert res[0]["messages"][0]["content"] == llava[0]["conversations"][0]["value"]
    assert res[0]["messages"][1] == {"role": "assistant", "content": "rouge\u00a0!"}
    assert (out.parent / res[0]["images"][0]).resolve() == (imgs / "sub" / "a.jpg").resolve()
    assert res[1]["images"] == [] and res[2]["images"] == []
    assert "日本 🙂" in out.read_text(encoding="utf-8")  # not \u-escaped
    rc = data_main(["llava-to-mllm", "--input", str(src), "--output", str(tmp_path / "s.json"), "--image-dir", str(imgs), "--strict"])
    assert rc == 1 and not (tmp_path / "s.json").exists()
    report = llava_to_mllm(src, tmp_path / "r.json", image_dir=imgs)
    assert report.kept == 3 and len(report.skipped) == 4


def test_llava_to_mllm_skips_a_lone_surrogate(tmp_path):
    """Half an emoji ("\\ud83d") in a turn or the id cannot be written as UTF-8: that sample is skipped
    and named, the others are written."""
    (tmp_path / "llava.json").write_text(
        '[{"id": "a", "conversations": [{"from": "human", "value": "ok \U0001f642"}, {"from": "gpt", "value": "fine"}]},'
        ' {"id": "b", "conversations": [{"from": "human", "value": "hi \\ud83d"}, {"from": "gpt", "value": "x"}]},'
        ' {"id": "c\\udc00", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}]',
        encoding="utf-8")
    report = llava_to_mllm(tmp_path / "llava.json", tmp_path / "out.json")
    assert report.kept == 1
    assert report.skipped == [("id b", f"{NOT_UTF8} in turn 0"), ("index 2", f"{NOT_UTF8} in 'id'")]
    out = json.loads((tmp_path / "out.json").read_text(encoding="utf-8"))
    assert [s["id"] for s in out] == ["a"] and out[0]["messages"][0]["content"] == "ok \U0001f642"


def test_video_task_answer_needs_the_motion(tmp_path):
    """make-shapes --videos: the stated direction is where the shape's centre goes from the first
    sampled frame to the last; llava-to-mllm keeps the videos."""
    import numpy as np

    from mmtune.data.shapes import BACKGROUND, DIRECTIONS
    from mmtune.data.video import VideoProcessor, decode_frames

    assert data_main(["make-shapes", "--out", str(tmp_path), "--num", "2", "--seed", "1", "--videos", "6"]) == 0
    path = tmp_path / "llava_format.json"
    videos = [s for s in json.loads(path.read_text()) if "video" in s]
    assert len(videos) == 6 and {s["conversations"][1]["value"] for s in videos} <= set(DIRECTIONS)
    for s in videos:
        plan = VideoProcessor().plan_file(tmp_path / s["video"])
        assert plan.grid[0] == 2  # two temporal patches: the answer needs more than one frame
        first, last = decode_frames(tmp_path / s["video"], [plan.indices[0], plan.indices[-1]])
        centres = [np.argwhere(np.abs(f.astype(int) - BACKGROUND).sum(-1) > 60).mean(0) for f in (first, last)]
        dy, dx = centres[1] - centres[0]
        want_x, want_y = DIRECTIONS[s["conversations"][1]["value"]]
        assert np.sign(round(dx / 4)) == want_x and np.sign(round(dy / 4)) == want_y, (s, dx, dy)
    mllm = tmp_path / "mllm.json"
    report = llava_to_mllm(path, mllm)
    assert report.kept == 8 and sum(1 for r in json.loads(mllm.read_text()) if r.get("videos")) == 6
