"""GLM-4.5V 3D (M-RoPE) position ids for one sample (docs/GLM45V.md section 3).

Tokens fall into runs: text, image (the `<|image|>` placeholders of one image) and video (image
placeholders inside a begin/end-of-video span; each video step is one (1, h, w) grid). A text run
of length L takes `pos + arange(L)` on the T, H and W rows; an image with LLM grid (1, h', w') takes
T = pos, H = pos + row, W = pos + col, and then pos += max(h', w').

Legend: L = tokens of one sample, N = images (or video steps).
"""

from __future__ import annotations

import torch


def mm_token_types(
    input_ids_L: torch.Tensor, *, image_token_id: int, video_start_token_id: int, video_end_token_id: int
) -> torch.Tensor:
    """0 text, 1 image placeholder, 2 image placeholder inside a video span (transformers' mm_token_type_ids);
    over the last dimension (one sample [L] or rows [B, L])."""
    is_image = input_ids_L == image_token_id
    inside_video = (torch.cumsum((input_ids_L == video_start_token_id).long(), -1)
                    - torch.cumsum((input_ids_L == video_end_token_id).long(), -1)) > 0
    types = is_image.long()
    types[is_image & inside_video] = 2
    return types


def get_rope_index(
    input_ids_L: torch.Tensor,
    image_grid_thw_N3: torch.Tensor | None = None,
    video_grid_thw_N3: torch.Tensor | None = None,
    *,
    image_token_id: int,
    video_start_token_id: int,
    video_end_token_id: int,
    spatial_merge_size: int = 2,
) -> tuple[torch.Tensor, int]:
    """Position ids `[3, L]` and the rope delta (max position + 1 - L) of one unpadded sample.

    `image_grid_thw_N3` lists the images of this sample in order; `video_grid_thw_N3` its videos
    (each (t, h, w) grid counts as t steps of (1, h, w)). Raises ValueError when the placeholders
    and the grids disagree.
    """
    assert input_ids_L.dim() == 1, "get_rope_index takes one sample: input_ids of shape [L]"
    types = mm_token_types(
        input_ids_L,
        image_token_id=image_token_id,
        video_start_token_id=video_start_token_id,
        video_end_token_id=video_end_token_id,
    ).tolist()
    grids = {1: _grid_list(image_grid_thw_N3), 2: _grid_list(video_grid_thw_N3, split_time=True)}
    used = {1: 0, 2: 0}
    pieces: list[torch.Tensor] = []
    pos, start, L = 0, 0, len(types)
    while start < L:
        kind, end = types[start], start + 1
        while end < L and types[end] == kind:
            end += 1
        if kind == 0:
            pieces.append(torch.arange(pos, pos + end - start).expand(3, -1))
            pos += end - start
            start = end
            continue
        # a run of placeholders may hold several images back to back: consume grids until it is covered
        while start < end:
            if used[kind] >= len(grids[kind]):
                what = "image" if kind == 1 else "video step"
                raise ValueError(f"more {what} placeholder tokens than {what} grids ({len(grids[kind])} given)")
            t, h, w = grids[kind][used[kind]]
            used[kind] += 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            n = t * gh * gw
            if start + n > end:
                raise ValueError(f"a grid {t, h, w} needs {n} placeholder tokens, the run has {end - start}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pieces.append(torch.stack([tt.flatten() + pos, hh.flatten() + pos, ww.flatten() + pos]))
            pos += max(gh, gw)
            start += n
    for kind, name in ((1, "image"), (2, "video step")):
        if used[kind] != len(grids[kind]):
            raise ValueError(f"{len(grids[kind])} {name} grids given but only {used[kind]} found in input_ids")
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    delta = int(positions.max()) + 1 - L if L else 0
    return positions.to(device=input_ids_L.device, dtype=torch.long), delta


def _grid_list(grid_N3: torch.Tensor | None, split_time: bool = False) -> list[tuple[int, int, int]]:
    if grid_N3 is None:
        return []
    out = []
    for t, h, w in grid_N3.tolist():
        out += [(1, h, w)] * t if split_time else [(t, h, w)]
    return out
