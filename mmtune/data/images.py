"""Images -> (pixel_values, image_grid_thw), identical to transformers' GLM-4V image processor.

Two resizes happen, in this order (the recipe is LLaMA-Factory-derived):
1. data.json `image_max_pixels` / `image_min_pixels` (counted as H*W): if H*W > max the image is scaled
   by sqrt(max / (H*W)), if H*W < min by sqrt(min / (H*W)); sides truncated to int, PIL's default
   resample; then converted to RGB. This is LLaMA-Factory's `_preprocess_image`.
2. The GLM processor, with `size` from the model dir's preprocessor_config.json (`shortest_edge` /
   `longest_edge`, which count the temporal patch: 2*H*W): `smart_resize` to multiples of
   patch*merge = 28, BICUBIC, rescale 1/255, normalise with the CLIP mean/std, and patchify into rows of
   C*T*14*14 = 1176 values in merge-block-major order. The result is bit-identical to
   `Glm4vImageProcessorPil` (tested): the rescale+normalise step is a 256-entry lookup table per channel
   computed with transformers' exact float64->float32 arithmetic.

The token count of an image follows from its size alone (`ImageProcessor.num_tokens(w, h)`), so
preprocessing reads only image headers; pixels are decoded in the loader workers.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(height: int, width: int, *, factor: int = 28, min_pixels: int = 112 * 112,
                 max_pixels: int = 28 * 28 * 15000, temporal: int = 2) -> tuple[int, int]:
    """GLM-4V's target (height, width): multiples of `factor` with temporal*H*W within [min, max]
    (docs/GLM45V.md section 2). Raises ValueError for an aspect ratio over 200."""
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.1f} is over 200")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if temporal * h_bar * w_bar > max_pixels:
        beta = math.sqrt(temporal * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif temporal * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (temporal * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def pre_resize_size(width: int, height: int, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) after the data.json image_min/max_pixels pre-resize (H*W, LLaMA-Factory style)."""
    if max_pixels is not None and width * height > max_pixels:
        f = math.sqrt(max_pixels / (width * height))
        width, height = max(1, int(width * f)), max(1, int(height * f))
    if min_pixels is not None and width * height < min_pixels:
        f = math.sqrt(min_pixels / (width * height))
        width, height = max(1, int(width * f)), max(1, int(height * f))
    return width, height


def _normalise_lut(mean, std, rescale: float) -> np.ndarray:
    """[256, 3] float32: transformers' rescale (float64 multiply, cast to float32) then (x - mean) / std
    in float32, for every uint8 value."""
    x = (np.arange(256, dtype=np.float64) * rescale).astype(np.float32)[:, None]
    return ((x - np.asarray(mean, dtype=np.float32)) / np.asarray(std, dtype=np.float32)).astype(np.float32)


@dataclass
class ImageProcessor:
    """GLM-4V image processing with the settings of a preprocessor_config.json plus the data.json
    pre-resize bounds. `process(images)` -> (pixel_values [P, 1176] float32, grid_thw [N, 3] int64)."""

    min_pixels: int = 112 * 112  # preprocessor size.shortest_edge (counts 2*H*W)
    max_pixels: int = 28 * 28 * 15000  # preprocessor size.longest_edge
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    pre_min_pixels: int | None = None  # data.json image_min_pixels (H*W)
    pre_max_pixels: int | None = None  # data.json image_max_pixels (H*W)
    _lut: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        self._lut = _normalise_lut(self.image_mean, self.image_std, self.rescale_factor)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, image_min_pixels: int | None = None,
                        image_max_pixels: int | None = None) -> "ImageProcessor":
        """Read `model_dir/preprocessor_config.json` (class defaults where it lacks a key)."""
        path = Path(model_dir) / "preprocessor_config.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no preprocessor_config.json in the model dir (the GLM image settings)")
        cfg = json.loads(path.read_text())
        size = cfg.get("size") or {}
        kw = {}
        if "shortest_edge" in size:
            kw["min_pixels"] = int(size["shortest_edge"])
        if "longest_edge" in size:
            kw["max_pixels"] = int(size["longest_edge"])
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor"):
            if key in cfg:
                kw[key] = cfg[key]
        for key in ("image_mean", "image_std"):
            if key in cfg:
                kw[key] = tuple(cfg[key])
        return cls(**kw, pre_min_pixels=image_min_pixels, pre_max_pixels=image_max_pixels)

    def fingerprint(self) -> dict:
        return {k: getattr(self, k) for k in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size",
                                              "merge_size", "image_mean", "image_std", "rescale_factor",
                                              "pre_min_pixels", "pre_max_pixels")}

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def target_size(self, width: int, height: int) -> tuple[int, int]:
        """(height, width) fed to the vision tower for an input of the given size."""
        w, h = pre_resize_size(width, height, self.pre_min_pixels, self.pre_max_pixels)
        return smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels,
                            temporal=self.temporal_patch_size)

    def grid_thw(self, width: int, height: int) -> tuple[int, int, int]:
        h, w = self.target_size(width, height)
        return 1, h // self.patch_size, w // self.patch_size

    def num_tokens(self, width: int, height: int) -> int:
        """LLM placeholder tokens of an image of this size: t*h*w / merge^2."""
        t, h, w = self.grid_thw(width, height)
        return t * h * w // self.merge_size**2

    def prepare(self, image: Image.Image) -> Image.Image:
        """The data.json pre-resize, then RGB (transparency composited onto white, as transformers does)."""
        w, h = pre_resize_size(image.width, image.height, self.pre_min_pixels, self.pre_max_pixels)
        if (w, h) != image.size:
            image = image.resize((w, h))
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return image.convert("RGB") if image.mode != "RGB" else image

    def process_one(self, image: Image.Image) -> tuple[np.ndarray, tuple[int, int, int]]:
        """One image -> (rows [h*w, 1176] float32, (1, h, w)), h/w in patches."""
        image = self.prepare(image)
        th, tw = smart_resize(image.height, image.width, factor=self.factor, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels, temporal=self.temporal_patch_size)
        if (tw, th) != image.size:
            image = image.resize((tw, th), resample=Image.Resampling.BICUBIC)
        p, m, T = self.patch_size, self.merge_size, self.temporal_patch_size
        gh, gw = th // p, tw // p
        x = np.asarray(image, dtype=np.uint8).reshape(gh // m, m, p, gw // m, m, p, 3)
        x = x.transpose(0, 3, 1, 4, 6, 2, 5)  # bh bw mh mw C ph pw (a view; uint8)
        out = np.empty((gh // m, gw // m, m, m, 3, T, p, p), np.float32)
        for c in range(3):  # normalise by table lookup straight into the patch layout
            values = self._lut[:, c][x[:, :, :, :, c]]
            for t in range(T):  # an image repeats along the temporal patch
                out[:, :, :, :, c, t] = values
        return out.reshape(gh * gw, 3 * T * p * p), (1, gh, gw)

    def process(self, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        rows, grids = [], []
        for img in images:
            r, g = self.process_one(img)
            rows.append(r)
            grids.append(g)
        if not rows:
            return np.zeros((0, 3 * self.temporal_patch_size * self.patch_size**2), np.float32), np.zeros((0, 3), np.int64)
        return np.concatenate(rows), np.asarray(grids, dtype=np.int64)


def open_image(path: str | os.PathLike, *, decode: bool = True) -> Image.Image:
    """Open an image file; ValueError naming it when it is unreadable or corrupt."""
    try:
        img = Image.open(path)
        if decode:
            img.load()
        return img
    except FileNotFoundError:
        raise
    except Exception as e:  # PIL raises many types for bad files
        raise ValueError(f"unreadable or corrupt image {path}: {e}") from e
