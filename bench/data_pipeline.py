"""Data pipeline benchmark (not a test): python bench/data_pipeline.py [--samples N] [--seed S]

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200, help="samples for the throughput part (default 200)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = p.parse_args(argv)
    bench_preprocessing(args.samples, args.seed)
    bench_packing(args.seed)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
