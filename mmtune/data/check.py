"""`mmtune data check --mm-data data.json`: read every sample as training would and name the bad ones.

Each sample goes through the training path (attr mapping, image path rules, tokenisation in the GLM
format, image decoding and processing, 3D positions); problems are printed as `file:index: reason`:
unreadable/corrupt image, `<image>` count != number of images, first turn not from the user, empty
assistant turn, too long for --seq-length, missing image file, image path outside dataset_dir, ...
The cache is neither read nor written.
"""

from __future__ import annotations

import sys
from pathlib import Path

from mmtune.data.collate import TokenIds, materialise
from mmtune.data.config import load_data_config
from mmtune.data.dataset import SamplePreprocessor, raw_samples


def check_data(mm_data: str, *, seq_length: int | None = None, tokenizer_dir: str | None = None,
               out=None) -> list[tuple[str, str]]:
    """Print every bad sample as `file:index: reason` and a summary to `out` (default stdout); return
    the (src, reason) list."""
    from tqdm import tqdm

    out = out or sys.stdout
    cfg = load_data_config(mm_data)
    tokenizer_dir = tokenizer_dir or cfg.preprocess.model_name_or_path
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer dir {tokenizer_dir!r} not found (preprocess_parameters.model_name_or_path "
                                "or --tokenizer-dir)")
    pre = SamplePreprocessor(cfg, tokenizer_dir)
    ids = TokenIds.from_tokenizer(pre.template.tokenizer)
    bad: list[tuple[str, str]] = []
    total = 0
    for rec, src in tqdm(raw_samples(cfg), desc="check", unit="sample", file=sys.stderr):
        total += 1
        cols = pre(rec, src)
        reason = cols["error"]
        if not reason:
            try:
                materialise(cols, cols["length"], pre.image_processor, ids, pre.video_processor)
            except ValueError as e:
                reason = str(e).removeprefix(f"{src}: ")
        if not reason and seq_length is not None and cols["length"] > seq_length:
            reason = f"too long for the sequence: {cols['length']} tokens > --seq-length {seq_length}"
        if reason:
            bad.append((src, reason))
            print(f"{src}: {reason}", file=out)
    print(f"checked {total} samples: {total - len(bad)} good, {len(bad)} bad", file=out)
    return bad
