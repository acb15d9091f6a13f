"""images.py: pixel_values / image_grid_thw bit-identical to transformers' GLM-4V image processor."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

from mmtune.data.images import ImageProcessor, pre_resize_size

REAL = (12544, 9633792)  # GLM-V checkpoints' size.shortest_edge / longest_edge
TINY = (1568, 100352)  # make-tiny's preprocessor_config.json


def _img(h, w, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.mark.parametrize("hw,size", [((28, 28), TINY), ((28, 28), REAL), ((50, 50), REAL), ((56, 56), TINY),
                                     ((3000, 4000), REAL), ((30, 2900), REAL), ((2900, 20), REAL), ((33, 77), TINY)])
def test_parity_with_transformers(hw, size):
    img = _img(*hw)
    other = _img(40, 60, seed=1)
    ref = Glm4vImageProcessorPil(size={"shortest_edge": size[0], "longest_edge": size[1]})(
        images=[img, other], return_tensors="np")
    ours = ImageProcessor(min_pixels=size[0], max_pixels=size[1])
    pv, grid = ours.process([img, other])
    assert grid.tolist() == ref["image_grid_thw"].tolist()
    assert pv.dtype == np.float32 and np.array_equal(pv, ref["pixel_values"])
    for g, im in zip(grid, (img, other)):
        assert ours.num_tokens(im.width, im.height) == g.prod() // 4


def test_known_sizes():
    p = ImageProcessor(min_pixels=REAL[0], max_pixels=REAL[1])
    assert p.target_size(1000, 700) == (700, 1008) and p.grid_thw(1000, 700) == (1, 50, 72)
    assert p.target_size(3000, 4000) == (2520, 1876)  # docs/GLM45V.md section 2
    assert p.target_size(50, 50) == (84, 84)
    with pytest.raises(ValueError, match="aspect ratio"):
        p.target_size(10000, 28)


def test_grayscale_and_alpha_match_transformers():
    ref = Glm4vImageProcessorPil(size={"shortest_edge": TINY[0], "longest_edge": TINY[1]})
    ours = ImageProcessor(min_pixels=TINY[0], max_pixels=TINY[1])
    for img in (_img(60, 45, "L"), _img(60, 45, "RGBA"), _img(30, 31, "P")):
        if img.mode == "RGBA":
            a = np.array(img)
            a[..., 3] = np.arange(45, dtype=np.uint8)[None, :] * 5
            img = Image.fromarray(a, "RGBA")
        assert np.array_equal(ours.process([img])[0], ref(images=[img], return_tensors="np")["pixel_values"])


def test_pre_resize_then_glm_processor(tmp_path):
    """data.json image_max/min_pixels: LLaMA-Factory-style H*W pre-resize before the GLM processor."""
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"size": {"shortest_edge": REAL[0], "longest_edge": REAL[1]}}))
    p = ImageProcessor.from_pretrained(tmp_path, image_max_pixels=262144, image_min_pixels=1024)
    assert (p.min_pixels, p.max_pixels, p.pre_max_pixels) == (REAL[0], REAL[1], 262144)
    big, small = _img(1200, 900), _img(20, 16)
    for img in (big, small):
        w, h = pre_resize_size(img.width, img.height, 1024, 262144)
        assert w * h <= 262144 * 1.0001 and (w * h >= 1024 * 0.9 or img is big)
        f = math.sqrt((262144 if img is big else 1024) / (img.width * img.height))
        assert (w, h) == (int(img.width * f), int(img.height * f))
        manual = img.resize((w, h))
        ref = Glm4vImageProcessorPil(size={"shortest_edge": REAL[0], "longest_edge": REAL[1]})(images=[manual], return_tensors="np")
        pv, grid = p.process([img])
        assert np.array_equal(pv, ref["pixel_values"]) and grid.tolist() == ref["image_grid_thw"].tolist()
        assert p.num_tokens(img.width, img.height) == grid[0].prod() // 4
    assert p.target_size(900, 1200)[0] * p.target_size(900, 1200)[1] < 900 * 1200  # shrunk by the pre-resize
