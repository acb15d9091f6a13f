"""Data pipeline benchmark (not a test): python bench/data_pipeline.py [--mode image|video|all] [--samples N] [--seed S]

1. Preprocessing throughput, side by side on the same LLaVA-like samples (COCO-sized JPEGs, 1-3 turns):
   - mmtune: SamplePreprocessor (attr mapping, image header, GLM template tokenisation with labels)
     + materialise (decode, data.json pre-resize, GLM image processing, 3D positions);
   - transformers: what its GLM-4V processor does: the same pre-resize, Glm4vImageProcessorPil,
     apply_chat_template(tokenize=False), `<|image|>` expanded to t*h*w/4 copies, tokenizer(text).
   Both single-process and interleaved sample by sample, same tokenizer (the tiny one: the real GLM tokenizer is not available offline),
   image sizes of GLM-V checkpoints (shortest_edge 12544, longest_edge 9633792) and the recipe's
   image_max/min_pixels (262144 / 1024). Prints samples/s and the ratio.
2. Packing efficiency (non-pad tokens / row capacity) on a LLaVA-like length mix: image tokens from COCO
   sizes through the same settings, text lengths log-normal, 10% text-only; offline best-fit (cached
   path) and best-fit over 8 open rows (streaming) at several seq lengths.
3. `--mode video`: video samples/s on the same MPEG-4 files (2-8 s, 24/30 fps, 320x240 to 640x360, one
   video and 1-2 turns each), GLM-4.5V sampling at the recipe's video_fps 2:
   - mmtune: SamplePreprocessor (header probe, frame plan, tokens with timestamps, labels) + materialise
     (decode the planned frames, resize, normalise, patchify, 3D positions);
   - transformers: its PyAV reader with Glm4vVideoProcessor.sample_frames, Glm4vVideoProcessor on the
     frames, apply_chat_template, Glm4vProcessor.replace_video_token, tokenizer(text). torchvision does
     not import here, so its resize runs through the stand-in of tests/hf_video.py (the F.interpolate call
     torchvision makes on the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

COCO_SIZES = [(640, 480), (480, 640), (640, 427), (500, 375), (640, 640), (427, 640), (612, 612), (640, 360)]
WORDS = ("the a shape image color red blue picture what where how many people sitting table street car dog "
         "cat man woman standing looking holding white black large small two three near next to").split()


def make_samples(root: Path, n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    samples = []
    for i in range(n):
        turns = rng.randint(1, 3)
        msgs = []
        for t in range(turns):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 80))) + "."
            msgs += [{"role": "user", "content": ("<image>\n" + q) if t == 0 else q}, {"role": "assistant", "content": a}]
        w, h = rng.choice(COCO_SIZES)
        base = nrng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)  # smooth-ish, JPEG-like content
        Image.fromarray(base).resize((w, h), Image.Resampling.BILINEAR).save(root / "img" / f"{i}.jpg", quality=90)
        samples.append({"messages": msgs, "images": [f"img/{i}.jpg"]})
    (root / "mllm.json").write_text(json.dumps(samples))
    return samples


def bench_preprocessing(n: int, seed: int) -> None:
    from transformers import AutoTokenizer
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from mmtune.data.collate import TokenIds, materialise
    from mmtune.data.config import parse_data_config
    from mmtune.data.dataset import SamplePreprocessor
    from mmtune.data.images import pre_resize_size
    from mmtune.data.tokenizer_tiny import save_tiny_tokenizer

    root = Path(tempfile.mkdtemp(prefix="mmtune-bench-"))
    save_tiny_tokenizer(root / "tok")
    size = {"shortest_edge": 12544, "longest_edge": 9633792}
    (root / "tok" / "preprocessor_config.json").write_text(json.dumps({"size": size}))
    samples = make_samples(root / "data", n, seed)
    cfg = parse_data_config({"dataset_param": {
        "preprocess_parameters": {"model_name_or_path": str(root / "tok"), "image_max_pixels": 262144, "image_min_pixels": 1024},
        "basic_parameters": {"dataset_dir": str(root / "data"), "dataset": "mllm.json", "enable_thinking": False}}})

    pre = SamplePreprocessor(cfg, root / "tok")
    ids = TokenIds.from_tokenizer(pre.template.tokenizer)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    hf_proc = Glm4vImageProcessorPil(size=size)
    image_token = "<|image|>"

    def ours(s, k):
        cols = pre(s, f"mllm.json:{k}")
        assert not cols["error"], cols["error"]
        return materialise(cols, cols["length"], pre.image_processor, ids)

    def theirs(s):
        img = Image.open(root / "data" / s["images"][0])
        w, h = pre_resize_size(img.width, img.height, 1024, 262144)
        img = img.resize((w, h)).convert("RGB")
        out = hf_proc(images=[img], return_tensors="np")
        n_tok = int(out["image_grid_thw"][0].prod()) // 4
        msgs = []
        for m in s["messages"]:
            if m["role"] == "user" and "<image>" in m["content"]:
                before, after = m["content"].split("<image>", 1)
                parts = ([{"type": "text", "text": before}] if before else []) + [{"type": "image"}, {"type": "text", "text": after}]
                msgs.append({"role": "user", "content": parts})
            else:
                msgs.append(m)
        text = tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)
        text = text.replace(image_token, "<|placeholder|>" * n_tok).replace("<|placeholder|>", image_token)
        return tok(text, add_special_tokens=False)["input_ids"], out["pixel_values"]

    # parity on the first samples (ids equal up to mmtune's trailing <|user|>, pixels equal)
    for k in range(3):
        a, (b_ids, b_pv) = ours(samples[k], k), theirs(samples[k])
        assert a.input_ids.tolist()[:-1] == b_ids and np.array_equal(a.pixel_values, b_pv), k
    ours(samples[0], 0), theirs(samples[0])  # warm-up
    t_ours = t_hf = 0.0
    for k, s in enumerate(samples):  # interleaved, so load changes on a shared machine hit both alike
        t0 = time.perf_counter()
        ours(s, k)
        t1 = time.perf_counter()
        theirs(s)
        t_ours, t_hf = t_ours + t1 - t0, t_hf + time.perf_counter() - t1
    print(f"preprocessing, {n} LLaVA-like samples (COCO-sized JPEGs, 1-3 turns), 1 process:")
    print(f"  mmtune        {n / t_ours:8.1f} samples/s  (tokens+labels, decode, resize, normalise, patchify, 3D positions)")
    print(f"  transformers  {n / t_hf:8.1f} samples/s  (apply_chat_template + Glm4vImageProcessorPil + expansion)")
    print(f"  ratio mmtune/transformers = {t_hf / t_ours:.2f}x")


def bench_packing(seed: int, n: int = 20000) -> None:
    from mmtune.data.images import ImageProcessor
    from mmtune.data.packing import OpenRowsPacker, plan_rows

    rng = random.Random(seed)
    proc = ImageProcessor(min_pixels=12544, max_pixels=9633792, pre_min_pixels=1024, pre_max_pixels=262144)
    lengths = []
    for _ in range(n):
        text = int(rng.lognormvariate(5.3, 0.8)) + 20
        img = 0 if rng.random() < 0.1 else proc.num_tokens(*rng.choice(COCO_SIZES)) + 2
        lengths.append(text + img)
    print(f"packing efficiency (non-pad tokens / capacity), {n} LLaVA-like samples, "
          f"mean length {sum(lengths) / n:.0f}, max {max(lengths)}:")
    for seq in (2048, 4096, 8192):
        ls = [min(x, seq) for x in lengths]
        rows = plan_rows(ls, seq)
        eff = sum(ls) / (len(rows) * seq)
        packer, n_rows = OpenRowsPacker(seq), 0
        for k, x in enumerate(ls):
            n_rows += len(packer.add(k, None, x))
        n_rows += len(packer.flush())
        print(f"  seq {seq:5d}: best-fit (cached) {100 * eff:5.1f}%  8 open rows (streaming) {100 * sum(ls) / (n_rows * seq):5.1f}%"
              f"  unpacked, padded to the longest of 8 {100 * _padded(ls, 8):5.1f}%")


def _padded(lengths, mbs):
    tot = 0
    for i in range(0, len(lengths) - mbs + 1, mbs):
        tot += max(lengths[i:i + mbs]) * mbs
    return sum(lengths[: (len(lengths) // mbs) * mbs]) / tot


VIDEO_SIZES = [(320, 240), (480, 270), (640, 360)]


def make_video_samples(root: Path, n: int, seed: int) -> list[dict]:
    from mmtune.data.video import write_video

    rng = random.Random(seed)
    nrng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        (w, h), fps, secs = rng.choice(VIDEO_SIZES), rng.choice((24, 30)), rng.randint(2, 8)
        base = nrng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w + 64, h), Image.Resampling.BILINEAR))
        frames = [np.ascontiguousarray(img[:, k % 64: k % 64 + w]) for k in range(fps * secs)]  # a panning shot
        write_video(root / "vid" / f"{i}.mp4", frames, fps)
        msgs = []
        for t in range(rng.randint(1, 2)):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 20))) + "?"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) + "."
            msgs += [{"role": "user", "content": ("<video>\n" + q) if t == 0 else q}, {"role": "assistant", "content": a}]
        samples.append({"messages": msgs, "videos": [f"vid/{i}.mp4"]})
    (root / "mllm.json").write_text(json.dumps(samples))
    return samples


def bench_video(n: int, seed: int) -> None:
    import types
    from functools import partial

    from transformers import AutoTokenizer
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import read_video_pyav

    from mmtune.data.collate import TokenIds, materialise
    from mmtune.data.config import parse_data_config
    from mmtune.data.dataset import SamplePreprocessor
    from mmtune.data.tokenizer_tiny import save_tiny_tokenizer

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from hf_video import with_tvf_stand_in

    root = Path(tempfile.mkdtemp(prefix="mmtune-bench-video-"))
    save_tiny_tokenizer(root / "tok")
    size = {"shortest_edge": 12544, "longest_edge": 28 * 28 * 2 * 30000}
    (root / "tok" / "preprocessor_config.json").write_text(json.dumps({"size": size}))
    samples = make_video_samples(root / "data", n, seed)
    cfg = parse_data_config({"dataset_param": {
        "preprocess_parameters": {"model_name_or_path": str(root / "tok"), "video_fps": 2.0},
        "basic_parameters": {"dataset_dir": str(root / "data"), "dataset": "mllm.json", "enable_thinking": False}}})
    pre = SamplePreprocessor(cfg, root / "tok")
    ids = TokenIds.from_tokenizer(pre.template.tokenizer)
    tok = AutoTokenizer.from_pretrained(root / "tok")
    hf_proc = Glm4vVideoProcessor(size=size)
    me = types.SimpleNamespace(video_processor=hf_proc, image_token="<|image|>")
    me.replace_frame_token_id = partial(Glm4vProcessor.replace_frame_token_id, me)

    def ours(s, k):
        cols = pre(s, f"mllm.json:{k}")
        assert not cols["error"], cols["error"]
        return materialise(cols, cols["length"], pre.image_processor, ids, pre.video_processor)

    def theirs(s):
        frames, meta = read_video_pyav(str(root / "data" / s["videos"][0]),
                                       lambda metadata, **kw: hf_proc.sample_frames(metadata, fps=2.0))
        out = hf_proc(videos=[frames], video_metadata=[meta], do_sample_frames=False, return_metadata=True,
                      return_tensors="np")
        msgs = [{"role": m["role"], "content": [{"type": "video"}, {"type": "text", "text": m["content"][len("<video>"):]}]}
                if "<video>" in m["content"] else m for m in s["messages"]]
        text = tok.apply_chat_template(msgs, tokenize=False, enable_thinking=False)
        text = text.replace("<|video|>", Glm4vProcessor.replace_video_token(me, out, 0))
        return tok(text, add_special_tokens=False)["input_ids"], out["pixel_values_videos"]

    with with_tvf_stand_in():
        for k in range(3):  # parity: ids equal up to mmtune's trailing <|user|>, pixels equal
            a, (b_ids, b_pv) = ours(samples[k], k), theirs(samples[k])
            assert a.input_ids.tolist()[:-1] == b_ids and np.array_equal(a.video_pixels, b_pv), k
        t_ours = t_hf = 0.0
        for k, s in enumerate(samples):  # interleaved
            t0 = time.perf_counter()
            ours(s, k)
            t1 = time.perf_counter()
            theirs(s)
            t_ours, t_hf = t_ours + t1 - t0, t_hf + time.perf_counter() - t1
    print(f"video preprocessing, {n} samples (MPEG-4, 2-8 s, 24/30 fps, 320x240..640x360), 1 process:")
    print(f"  mmtune        {n / t_ours:8.2f} samples/s  (probe, plan, tokens+labels, decode, resize, normalise, "
          "patchify, 3D positions)")
    print(f"  transformers  {n / t_hf:8.2f} samples/s  (PyAV reader + Glm4vVideoProcessor + apply_chat_template + "
          "replace_video_token + tokenizer)")
    print(f"  ratio mmtune/transformers = {t_hf / t_ours:.2f}x")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=["image", "video", "all"], default="image",
                   help="image: image preprocessing and packing (default); video: video preprocessing; all: both")
    p.add_argument("--samples", type=int, default=200, help="samples for the throughput part (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    if args.mode in ("image", "all"):
        bench_preprocessing(args.samples, args.seed)
        bench_packing(args.seed)
    if args.mode in ("video", "all"):
        bench_video(args.samples, args.seed)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
