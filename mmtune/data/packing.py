"""Packing samples into rows of <= seq_length tokens, and cutting samples that are too long.

`plan_rows` is offline best-fit-decreasing over the whole (cached) data set: samples sorted by length
(longest first, ties by index) go each into the fullest row that still has room; rows keep their
samples in that order. It is independent of the shuffle seed: the sampler shuffles whole rows.
`OpenRowsPacker` is the streaming variant: up to `open_rows` rows stay open; each arriving sample goes
into the open row it fits best, else a new row opens and, when too many are open, the fullest is emitted.
Its open rows are named by item keys, so a stream can save them and rebuild them on resume. Both report efficiency = real tokens / (rows * seq_length).

A sample longer than seq_length is dropped or truncated (`too_long`). Truncation never cuts inside an
image or a video: the cut moves back to before the image's `<|begin_of_image|>` (the video's
`<|begin_of_video|>`), and the images and videos after the cut are dropped with it. A truncated sample
with no trained token left is dropped.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field


@dataclass
class PackStats:
    samples: int = 0
    rows: int = 0
    tokens: int = 0
    seq_length: int = 0
    dropped_too_long: int = 0
    truncated: int = 0

    @property
    def efficiency(self) -> float:
        """Real (non-pad) tokens / row capacity."""
        return self.tokens / max(1, self.rows * self.seq_length)

    def summary(self) -> str:
        return (f"{self.samples} samples in {self.rows} rows of {self.seq_length} tokens, packing efficiency "
                f"{100 * self.efficiency:.1f}%; too long: {self.dropped_too_long} dropped, {self.truncated} truncated")


def truncation_point(input_ids: list[int], labels: list[int], seq_length: int, *, image_token_id: int,
                     image_start_token_id: int, video_start_token_id: int | None = None,
                     video_end_token_id: int | None = None) -> int | None:
    """The kept length of a too-long sample cut to <= seq_length without splitting an image or a video,
    or None when nothing trainable would remain (labels are unshifted: position 0 is never a target)."""
    cut = seq_length
    if video_start_token_id is not None and cut < len(input_ids):
        head = input_ids[:cut]
        starts = [i for i, t in enumerate(head) if t == video_start_token_id]
        if starts and head.count(video_start_token_id) > head.count(video_end_token_id):
            cut = starts[-1]  # inside a video: keep none of it
    if cut < len(input_ids) and input_ids[cut] == image_token_id:
        while cut > 0 and input_ids[cut - 1] == image_token_id:
            cut -= 1
        if cut > 0 and input_ids[cut - 1] == image_start_token_id:
            cut -= 1
    if not any(lab != -100 for lab in labels[1:cut]):
        return None
    return cut


def plan_rows(lengths: list[int], seq_length: int, *, pack: bool = True) -> list[list[int]]:
    """Rows of sample positions (indices into `lengths`); every length must be <= seq_length.
    pack=False: one sample a row, in order."""
    if not pack:
        return [[i] for i in range(len(lengths))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, row number)
    for i in order:
        n = lengths[i]
        assert 0 < n <= seq_length, (i, n)
        k = bisect.bisect_left(free, (n, -1))
        if k < len(free):
            room, r = free.pop(k)
            rows[r].append(i)
            room -= n
        else:
            r, room = len(rows), seq_length - n
            rows.append([i])
        if room > 0:
            bisect.insort(free, (room, r))
    return rows


@dataclass
class OpenRowsPacker:
    """Online best-fit over a few open rows. Items are (key, payload, length); `add` returns the rows
    (lists of items) it closes: a row that became full, or the fullest one when a new row pushes the
    count over `open_rows`. `flush()` closes all, fullest first. `open_keys()` names the open rows."""

    seq_length: int
    open_rows: int = 8
    rows: list = field(default_factory=list)  # [used, [items]]

    def add(self, key, payload, length: int) -> list[list]:
        assert 0 < length <= self.seq_length
        fits = [r for r in self.rows if r[0] + length <= self.seq_length]
        if fits:
            row = max(fits, key=lambda r: r[0])
        else:
            row = [0, []]
            self.rows.append(row)
        row[0] += length
        row[1].append((key, payload, length))
        done = [r for r in self.rows if r[0] == self.seq_length]
        if not done and len(self.rows) > self.open_rows:
            done = [max(self.rows, key=lambda r: r[0])]
        for r in done:
            self.rows.remove(r)
        return [r[1] for r in done]

    def flush(self) -> list[list]:
        out = [r[1] for r in sorted(self.rows, key=lambda r: -r[0])]
        self.rows = []
        return out

    def open_keys(self) -> list[list]:
        return [[key for key, _, _ in r[1]] for r in self.rows]

    def restore(self, keys: list[list], items: dict) -> None:
        """Rebuild open rows named by `open_keys()`; `items[key]` = (payload, length); missing keys are skipped."""
        self.rows = []
        for row_keys in keys:
            row = [0, []]
            for k in row_keys:
                if k in items:
                    payload, length = items[k]
                    row[0] += length
                    row[1].append((k, payload, length))
            if row[1]:
                self.rows.append(row)
