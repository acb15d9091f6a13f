"""Samples -> the training batch of docs/INTERNALS.md ("A training batch").

`materialise(...)` turns one preprocessed sample (token ids, unshifted labels, image and video paths and
grids) into a `Sample` with decoded pixels and 3D positions; it runs in the loader workers. `collate(rows)`
lays rows (lists of samples; one sample a row when not packing) into:

  input_ids [B, S] (pad id), labels [B, S] already shifted (-100 at each sample's last token and on
  pads), position_ids [3, B, S] (per-sample 3D positions restarting at 0; pad runs get arange),
  cu_seqlens int32 [K+1] (each sample and each pad run a segment, over the flattened B*S tokens),
  pixel_values [P, 1176] / image_grid_thw [N, 3] in token order (absent without images),
  pixel_values_videos [Pv, 1176] / video_grid_thw [Nv, 3] likewise for videos, num_samples.

S is `pad_to` when given (packed rows: seq_length), else the longest row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from mmtune.data.images import ImageProcessor, open_image
from mmtune.data.video import VideoProcessor, decode_frames
from mmtune.models.glm4v_moe.rope import get_rope_index, mm_token_types

IGNORE = -100


@dataclass
class TokenIds:
    pad: int
    image: int
    image_start: int
    video_start: int
    video_end: int

    @classmethod
    def from_tokenizer(cls, tok) -> "TokenIds":
        get = tok.convert_tokens_to_ids
        return cls(pad=tok.pad_token_id if tok.pad_token_id is not None else get("<|endoftext|>"),
                   image=get("<|image|>"), image_start=get("<|begin_of_image|>"),
                   video_start=get("<|begin_of_video|>"), video_end=get("<|end_of_video|>"))


@dataclass
class Sample:
    input_ids: torch.Tensor  # [L] long
    labels: torch.Tensor  # [L] long, shifted
    position_ids: torch.Tensor  # [3, L]
    pixel_values: np.ndarray | None  # [P, 1176]
    grids: list[list[int]]
    src: str
    video_pixels: np.ndarray | None = None  # [Pv, 1176]
    video_grids: list[list[int]] = dataclasses.field(default_factory=list)


def _kept(grids: list, n_tokens: int, merge: int) -> list[list[int]]:
    """The leading grids whose t*h*w/merge placeholder tokens fit in n_tokens (the rest were cut off)."""
    out, used = [], 0
    for g in grids:
        n = g[0] * g[1] * g[2] // merge
        if used + n > n_tokens:
            break
        out.append(list(g))
        used += n
    return out


def materialise(columns: dict, keep_len: int, improc: ImageProcessor, ids: TokenIds,
                vidproc: VideoProcessor | None = None) -> Sample:
    """One preprocessed sample, cut to `keep_len` tokens (images and videos past the cut dropped), pixels
    decoded. Raises ValueError naming the sample when an image or video cannot be decoded or disagrees
    with what preprocessing saw."""
    input_ids = torch.tensor(columns["input_ids"][:keep_len], dtype=torch.long)
    raw_labels = torch.tensor(columns["labels"][:keep_len], dtype=torch.long)
    labels = torch.full_like(raw_labels, IGNORE)
    labels[:-1] = raw_labels[1:]
    types = mm_token_types(input_ids, image_token_id=ids.image, video_start_token_id=ids.video_start,
                           video_end_token_id=ids.video_end)
    merge = improc.merge_size**2
    grids = _kept(columns["grids"], int((types == 1).sum()), merge)
    video_grids = _kept(columns.get("video_grids") or [], int((types == 2).sum()), merge)
    pixel_values = video_pixels = None
    if grids:
        rows = []
        for path, g in zip(columns["images"], grids):
            try:
                with open_image(path) as img:
                    r, got = improc.process_one(img)
            except (ValueError, OSError) as e:
                raise ValueError(f"{columns['src']}: {e}") from e
            if list(got) != list(g):
                raise ValueError(f"{columns['src']}: image {path} now gives grid {got}, preprocessing saw {g}; "
                                 "the file changed since the cache was built (set overwrite_cache: true)")
            rows.append(r)
        pixel_values = np.concatenate(rows)
    if video_grids:
        assert vidproc is not None, "a sample with videos needs the VideoProcessor"
        rows = []
        for path, g, frames in zip(columns["videos"], video_grids, columns["video_frames"]):
            try:
                plan = vidproc.plan_file(path)
                if list(plan.grid) != list(g) or plan.indices != list(frames):
                    raise ValueError(f"video {path} now gives grid {list(plan.grid)} from frames {plan.indices}, "
                                     f"preprocessing saw {g} from {list(frames)}; the file changed since the cache "
                                     "was built (set overwrite_cache: true)")
                rows.append(vidproc.process_frames(decode_frames(path, plan.indices), plan))
            except (ValueError, OSError) as e:
                raise ValueError(f"{columns['src']}: {e}") from e
        video_pixels = np.concatenate(rows)
    grid_t = torch.tensor(grids, dtype=torch.long) if grids else None
    video_t = torch.tensor(video_grids, dtype=torch.long) if video_grids else None
    pos, _ = get_rope_index(input_ids, grid_t, video_t, image_token_id=ids.image, video_start_token_id=ids.video_start,
                            video_end_token_id=ids.video_end, spatial_merge_size=improc.merge_size)
    return Sample(input_ids, labels, pos, pixel_values, grids, columns["src"], video_pixels, video_grids)


def collate(rows: list[list[Sample]], *, pad_id: int, pad_to: int | None = None) -> dict:
    """Rows of samples -> the training batch (see the module docstring)."""
    lengths = [sum(len(s.input_ids) for s in row) for row in rows]
    S = pad_to if pad_to is not None else max(max(lengths), 1)
    assert max(lengths) <= S, (lengths, S)
    B = len(rows)
    input_ids = torch.full((B, S), pad_id, dtype=torch.long)
    labels = torch.full((B, S), IGNORE, dtype=torch.long)
    position_ids = torch.empty((3, B, S), dtype=torch.long)
    bounds, pixels, grids, num_samples = [0], [], [], 0
    video_pixels, video_grids = [], []
    for b, row in enumerate(rows):
        t = 0
        for s in row:
            n = len(s.input_ids)
            input_ids[b, t:t + n] = s.input_ids
            labels[b, t:t + n] = s.labels
            position_ids[:, b, t:t + n] = s.position_ids
            t += n
            bounds.append(b * S + t)
            num_samples += 1
            if s.pixel_values is not None:
                pixels.append(s.pixel_values)
                grids += s.grids
            if s.video_pixels is not None:
                video_pixels.append(s.video_pixels)
                video_grids += s.video_grids
        if t < S:
            position_ids[:, b, t:] = torch.arange(S - t)
            bounds.append((b + 1) * S)
    batch = {
        "input_ids": input_ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seqlens": torch.tensor(bounds, dtype=torch.int32),
        "num_samples": num_samples,
    }
    if pixels:
        batch["pixel_values"] = torch.from_numpy(np.concatenate(pixels))
        batch["image_grid_thw"] = torch.tensor(grids, dtype=torch.long)
    if video_pixels:
        batch["pixel_values_videos"] = torch.from_numpy(np.concatenate(video_pixels))
        batch["video_grid_thw"] = torch.tensor(video_grids, dtype=torch.long)
    return batch
