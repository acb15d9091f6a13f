"""Videos -> (pixel_values_videos rows, video_grid_thw, frame timestamps), as transformers' GLM-4V
video processor gives them (docs/GLM45V.md section 7).

1. Metadata from the container header with PyAV, as transformers' PyAV reader takes it: total frames
   (the stream's frame count; counted from the packets when the header lacks it), fps (the stream's
   average rate), duration = frames / fps. A video without frames or frame rate is a ValueError.
2. Frame indices, by the model dir's processor flavour (`VideoProcessor.flavour`):
   - "glm4v" (GLM-4.5V, `Glm4vVideoProcessor.sample_frames`): within `max_duration` (300 s) n =
     max(floor(duration * fps), 1) frames at ceil(i * src_fps / fps); beyond it, linspace over
     max_duration * fps seconds. fps = data.json video_fps (default: the processor's fps, 2).
   - "glm46v" (GLM-4.6V, `Glm46VVideoProcessor.sample_frames`): fps by duration (3 per temporal patch
     up to 30 s, 1 up to 300 s, 0.5 beyond; at most 640 frames / 2400 s), video_fps is not used.
   Then duplicates are dropped, data.json `video_maxlen` thins the frames uniformly to at most
   maxlen (rounded down to even), and the count is padded to even by repeating the last frame.
3. The frames are decoded (RGB24), pre-resized per frame with data.json video_max_pixels /
   video_min_pixels (H*W, PIL, as images are), then `smart_resize` with the frame count (the
   processor's `size` counts T*H*W) and resized with torch's bicubic antialiased uint8 kernel, which is
   the call torchvision's resize makes on the CPU; rescaled and normalised in float32 as transformers'
   fused step does ((x - mean/r) / (std/r)); patchified T-major into rows of C*T*14*14.
4. Timestamps: frame index / fps of the first frame of each temporal patch; text `str(int(s))` for
   GLM-4.5V, `f"{s:.1f} seconds"` for GLM-4.6V (the processors' `replace_frame_token_id`).

The grid and the timestamps follow from the header alone (`VideoProcessor.plan`), so preprocessing
does not decode; the loader workers decode (`VideoProcessor.process`).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mmtune.data.images import CLIP_MEAN, CLIP_STD, pre_resize_size, smart_resize

FLAVOURS = ("glm4v", "glm46v")


@dataclass(frozen=True)
class VideoMeta:
    total_frames: int
    fps: float
    width: int
    height: int
    duration: float  # seconds: frames / fps, computed on the header's exact rational rate


@dataclass(frozen=True)
class VideoPlan:
    """What a video becomes: the frames to decode, the (t, h, w) patch grid, the timestamp texts (one
    per temporal patch) and the (height, width) each frame is resized to."""

    indices: list[int]
    grid: tuple[int, int, int]
    timestamps: list[str]
    size: tuple[int, int]


def _open(path):
    import av

    try:
        return av.open(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # PyAV raises many types (InvalidDataError, ...) for bad files
        raise ValueError(f"unreadable video {path}: {e}") from e


def probe_video(path: str | os.PathLike) -> VideoMeta:
    """The header facts sampling needs; ValueError naming the file when it has no video stream, no
    frames or no frame rate."""
    with _open(path) as container:
        if not container.streams.video:
            raise ValueError(f"video {path} has no video stream")
        stream = container.streams.video[0]
        frames, rate = int(stream.frames or 0), stream.average_rate
        width, height = int(stream.width or 0), int(stream.height or 0)
        if frames <= 0:
            try:
                frames = sum(1 for p in container.demux(stream) if p.size)
            except Exception as e:
                raise ValueError(f"unreadable video {path}: {e}") from e
    if frames <= 0:
        raise ValueError(f"video {path} has no frames")
    if not rate or float(rate) <= 0:
        raise ValueError(f"video {path} has no frame rate in its header")
    if width <= 0 or height <= 0:
        raise ValueError(f"video {path} has no frame size in its header")
    return VideoMeta(frames, float(rate), width, height, float(frames / rate))


def raw_indices(meta: VideoMeta, flavour: str, *, fps: float, max_duration: float, temporal_patch_size: int = 2) -> list[int]:
    """Frame indices before de-duplication, as the flavour's `sample_frames` computes them."""
    total, last = meta.total_frames, meta.total_frames - 1
    duration = meta.duration or round(last / meta.fps) + 1
    if flavour == "glm4v":
        if duration <= max_duration:
            n = max(int(math.floor(duration * fps)), 1)
            return [min(last, int(math.ceil(i * meta.fps / fps))) for i in range(n)]
        num = int(max_duration * fps)
        if num >= total:
            return list(range(total))
        return [min(last, int(math.ceil(t * meta.fps))) for t in np.linspace(0, duration, num, endpoint=True)]
    assert flavour == "glm46v", flavour
    effective = min(duration, 2400)
    target = 3 if effective <= 30 else 1 if effective <= 300 else 0.5
    extract = min(int(effective * target * temporal_patch_size), 640)
    if total < extract:
        return np.linspace(0, last, extract, dtype=int).tolist()
    indices, second, step, max_second = [], 0.0, 1 / (temporal_patch_size * target), int(duration)
    for i in range(total):
        if i * (1 / meta.fps) >= second:
            second += step
            indices.append(i)
            if second >= max_second:
                break
    if len(indices) < extract:
        start, end = (indices[0], indices[-1]) if indices else (0, last)
        return np.linspace(start, end, extract, dtype=int).tolist()
    if len(indices) > extract:
        return np.linspace(0, last, extract, dtype=int).tolist()
    return indices


def sample_indices(meta: VideoMeta, flavour: str, *, fps: float, max_duration: float, maxlen: int | None = None,
                   temporal_patch_size: int = 2) -> list[int]:
    """The frames a video is read at: the flavour's indices, duplicates dropped, thinned to `maxlen`
    (rounded down to a multiple of the temporal patch), padded to a multiple of the temporal patch."""
    seen: set[int] = set()
    uniq = [i for i in raw_indices(meta, flavour, fps=fps, max_duration=max_duration,
                                   temporal_patch_size=temporal_patch_size) if not (i in seen or seen.add(i))]
    if maxlen is not None:
        cap = max(temporal_patch_size, maxlen - maxlen % temporal_patch_size)
        if len(uniq) > cap:
            uniq = [uniq[k] for k in np.linspace(0, len(uniq) - 1, cap).round().astype(int)]
    while len(uniq) % temporal_patch_size:
        uniq.append(uniq[-1])
    return uniq


def timestamp_text(seconds: float, flavour: str) -> str:
    return f"{seconds:.1f} seconds" if flavour == "glm46v" else str(int(seconds))


def _fused_mean_std(mean, std, rescale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' fused rescale + normalise constants: mean / r and std / r as float32 [3, 1, 1]."""
    return ((torch.tensor(mean) * (1.0 / rescale)).view(3, 1, 1), (torch.tensor(std) * (1.0 / rescale)).view(3, 1, 1))


def decode_frames(path: str | os.PathLike, indices: list[int]) -> list[np.ndarray]:
    """RGB24 frames [H, W, 3] uint8 at `indices` (in order, repeats allowed), decoding sequentially."""
    wanted = sorted(set(indices))
    got: dict[int, np.ndarray] = {}
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i > wanted[-1]:
                    break
                if i in wanted:
                    got[i] = frame.to_ndarray(format="rgb24")
        except Exception as e:
            raise ValueError(f"unreadable video {path}: {e}") from e
    missing = [i for i in wanted if i not in got]
    if missing:
        raise ValueError(f"video {path} decodes to fewer frames than its header says (frame {missing[0]} missing)")
    return [got[i] for i in indices]


@dataclass
class VideoProcessor:
    """GLM-4V video processing with a model dir's video processor settings and the data.json video
    bounds. `plan(meta)` from the header; `process(path)` -> (rows [T/2*h*w, 1176] float32, plan)."""

    flavour: str = "glm4v"
    min_pixels: int = 112 * 112  # size.shortest_edge (counts T*H*W)
    max_pixels: int = 28 * 28 * 2 * 30000  # size.longest_edge
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple = CLIP_MEAN
    image_std: tuple = CLIP_STD
    rescale_factor: float = 1 / 255
    fps: float = 2.0  # the processor's default sampling fps (GLM-4.5V flavour)
    max_duration: float = 300
    video_fps: float | None = None  # data.json video_fps
    maxlen: int | None = None  # data.json video_maxlen
    pre_min_pixels: int | None = None  # data.json video_min_pixels (H*W per frame)
    pre_max_pixels: int | None = None  # data.json video_max_pixels
    _mean_std: tuple = field(init=False, repr=False)

    def __post_init__(self):
        if self.flavour not in FLAVOURS:
            raise ValueError(f"video processor flavour {self.flavour!r} is not one of {FLAVOURS}")
        self._mean_std = _fused_mean_std(self.image_mean, self.image_std, self.rescale_factor)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike, *, video_fps: float | None = None,
                        video_maxlen: int | None = None, video_min_pixels: int | None = None,
                        video_max_pixels: int | None = None) -> "VideoProcessor":
        """The settings transformers' AutoVideoProcessor would read: processor_config.json's
        "video_processor", else video_preprocessor_config.json, else preprocessor_config.json (class
        defaults where a key is missing). GLM-4.6V behaviour when the video processor type or the
        processor class (those files or tokenizer_config.json) names Glm46V."""
        d = Path(model_dir)
        files = {n: json.loads((d / n).read_text()) for n in ("processor_config.json", "video_preprocessor_config.json",
                                                              "preprocessor_config.json", "tokenizer_config.json")
                 if (d / n).is_file()}
        nested = files.get("processor_config.json", {}).get("video_processor")
        cfg = nested if isinstance(nested, dict) else files.get("video_preprocessor_config.json",
                                                                files.get("preprocessor_config.json"))
        if cfg is None:
            raise FileNotFoundError(f"{d}: no video_preprocessor_config.json or preprocessor_config.json "
                                    "(the GLM video processor settings)")
        names = [str(f.get(k, "")) for f in (*files.values(), cfg) for k in ("processor_class", "video_processor_type")]
        kw = {"flavour": "glm46v" if any(n.startswith("Glm46V") for n in names) else "glm4v"}
        size = cfg.get("size") or {}
        if "shortest_edge" in size:
            kw["min_pixels"] = int(size["shortest_edge"])
        if "longest_edge" in size:
            kw["max_pixels"] = int(size["longest_edge"])
        for key in ("patch_size", "temporal_patch_size", "merge_size", "rescale_factor", "fps", "max_duration"):
            if cfg.get(key) is not None:
                kw[key] = cfg[key]
        for key in ("image_mean", "image_std"):
            if key in cfg:
                kw[key] = tuple(cfg[key])
        return cls(**kw, video_fps=video_fps, maxlen=video_maxlen, pre_min_pixels=video_min_pixels,
                   pre_max_pixels=video_max_pixels)

    def fingerprint(self) -> dict:
        return {k: getattr(self, k) for k in ("flavour", "min_pixels", "max_pixels", "patch_size",
                                              "temporal_patch_size", "merge_size", "image_mean", "image_std",
                                              "rescale_factor", "fps", "max_duration", "video_fps", "maxlen",
                                              "pre_min_pixels", "pre_max_pixels")}

    def plan(self, meta: VideoMeta) -> VideoPlan:
        """Frames, grid, timestamps and resized size of a video, from its header."""
        fps = self.video_fps if self.video_fps is not None else self.fps
        indices = sample_indices(meta, self.flavour, fps=fps, max_duration=self.max_duration, maxlen=self.maxlen,
                                 temporal_patch_size=self.temporal_patch_size)
        f = self.patch_size * self.merge_size
        if len(indices) * f * f > self.max_pixels:
            raise ValueError(f"{len(indices)} frames do not fit the video pixel budget: size.longest_edge "
                             f"{self.max_pixels} counts frames x height x width, and even {f}x{f} frames need "
                             f"{len(indices) * f * f}; lower video_fps or set video_maxlen")
        w, h = pre_resize_size(meta.width, meta.height, self.pre_min_pixels, self.pre_max_pixels)
        th, tw = smart_resize(h, w, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                              max_pixels=self.max_pixels, temporal=len(indices))
        grid = (len(indices) // self.temporal_patch_size, th // self.patch_size, tw // self.patch_size)
        stamps = [timestamp_text(i / meta.fps, self.flavour) for i in indices[:: self.temporal_patch_size]]
        return VideoPlan(indices, grid, stamps, (th, tw))

    def plan_file(self, path: str | os.PathLike) -> VideoPlan:
        """`plan` of a video file; ValueError naming the file."""
        meta = probe_video(path)
        try:
            return self.plan(meta)
        except ValueError as e:
            raise ValueError(f"video {path}: {e}") from None

    def frame_tokens(self, grid: tuple[int, int, int] | list[int]) -> int:
        """LLM placeholder tokens of one temporal patch of a video with this grid: h*w / merge^2."""
        return grid[1] * grid[2] // self.merge_size**2

    def process(self, path: str | os.PathLike) -> tuple[np.ndarray, VideoPlan]:
        """Decode the planned frames of one video file and turn them into patch rows."""
        plan = self.plan_file(path)
        frames = decode_frames(path, plan.indices)
        return self.process_frames(frames, plan), plan

    def process_frames(self, frames: list[np.ndarray], plan: VideoPlan) -> np.ndarray:
        """[H, W, 3] uint8 frames (as decoded) -> rows [t*h*w, C*T*P*P] float32 in merge-block-major order."""
        if self.pre_min_pixels is not None or self.pre_max_pixels is not None:
            frames = [self._pre_resize(f) for f in frames]
        x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)  # [T, C, H, W] uint8
        th, tw = plan.size
        if x.shape[-2:] != (th, tw):
            x = F.interpolate(x.contiguous(), size=(th, tw), mode="bicubic", align_corners=False, antialias=True)
        p, m, T = self.patch_size, self.merge_size, self.temporal_patch_size
        gt, gh, gw = plan.grid
        # patchify the uint8 pixels first (a 1-byte copy), then rescale + normalise once in that layout
        u = x.reshape(gt, T, 3, gh // m, m, p, gw // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8).contiguous()
        mean, std = self._mean_std
        values = u.float().sub_(mean.view(3, 1, 1, 1)).div_(std.view(3, 1, 1, 1))
        return values.view(gt * gh * gw, 3 * T * p * p).numpy()

    def _pre_resize(self, frame: np.ndarray) -> np.ndarray:
        h, w = frame.shape[:2]
        nw, nh = pre_resize_size(w, h, self.pre_min_pixels, self.pre_max_pixels)
        if (nw, nh) == (w, h):
            return frame
        return np.asarray(Image.fromarray(frame).resize((nw, nh)))


def write_video(path: str | os.PathLike, frames: list[np.ndarray], fps: float) -> Path:
    """Write RGB uint8 frames [H, W, 3] (even H and W) as an MPEG-4 file (for make-shapes and tests)."""
    import av
    from fractions import Fraction

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp" + path.suffix)
    with av.open(str(tmp), "w") as c:
        stream = c.add_stream("mpeg4", rate=Fraction(fps).limit_denominator(1000))
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"qscale": "2"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    os.replace(tmp, path)
    return path
