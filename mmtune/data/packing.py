"""Packing samples into rows of <= seq_length tokens, and cutting samples that are too long.

`plan_rows` is offline best-fit-decreasing over the whole (cached) data set: samples sorted by length
(longest first, ties by index) go each into the fullest row that still has room; rows keep their
samples in that order. It is independent of the shuffle seed: the sampler shuffles whole rows.
`NextFitPacker` is the streaming variant: samples go into the current row in arrival order; when one
does not fit the row is emitted. Both report efficiency = real tokens / (rows * seq_length).

A sample longer than seq_length is dropped or truncated (`too_long`). Truncation never cuts inside an
image: the cut moves back to before the image's `<|begin_of_image|>`, and the images after the cut are
dropped with it. A truncated sample with no trained token left is dropped.
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
                     image_start_token_id: int) -> int | None:
    """The kept length of a too-long sample cut to <= seq_length without splitting an image, or None
    when nothing trainable would remain (labels are unshifted: position 0 is never a target)."""
    cut = seq_length
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
class NextFitPacker:
    """Online packing for streaming: `add(item, length)` returns a finished row (list of items) or None;
    `flush()` returns the last partial row."""

    seq_length: int
    row: list = field(default_factory=list)
    used: int = 0

    def add(self, item, length: int):
        assert 0 < length <= self.seq_length
        out = None
        if self.used + length > self.seq_length:
            out, self.row, self.used = self.row, [], 0
        self.row.append(item)
        self.used += length
        return out

    def flush(self):
        out, self.row, self.used = self.row, [], 0
        return out or None
