"""`mmtune data <tool>`: make-shapes, llava-to-mllm, check, preprocess. Thin: parses flags, calls mmtune.data.

Exit codes: 0 done; 1 `check` found bad samples (their count is the last line), or `llava-to-mllm --strict`
found samples it cannot convert; 2 `check` / `preprocess` could not run (bad flag, config or file; the message
names it; make-shapes / llava-to-mllm say so with 1)."""

from __future__ import annotations

import argparse
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mmtune data", description="data tools")
    sub = p.add_subparsers(dest="tool", required=True, metavar="{make-shapes,llava-to-mllm,check,preprocess}")

    s = sub.add_parser("make-shapes", help="write the synthetic shapes VQA data set (LLaVA format)",
                       description="Write DIR/images/*.png (56x56 coloured shapes), with --videos DIR/videos/*.mp4 (a "
                       "moving shape), and DIR/llava_format.json.")
    s.add_argument("--out", required=True, help="output directory (created if missing)")
    s.add_argument("--num", type=int, default=2000, help="number of samples (default 2000)")
    s.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives the same files (default 0)")
    s.add_argument("--videos", type=int, default=0,
                   help="also write this many video samples (DIR/videos/*.mp4, 'Which way does the shape move?'; "
                        "default 0)")

    s = sub.add_parser("llava-to-mllm", help="convert LLaVA-Instruct json to the MLLM format",
                       description="Convert LLaVA-Instruct samples (image, conversations) to MLLM samples "
                       "(messages, images). Image paths are written relative to the output file's folder, "
                       "which becomes the data set's dataset_dir. Skipped samples are listed with the reason.")
    s.add_argument("--input", required=True, help="LLaVA json (a list) or jsonl file")
    s.add_argument("--output", required=True, help="MLLM json file to write")
    s.add_argument("--image-dir", default=None,
                   help="folder the LLaVA image paths are relative to (default: the input file's folder)")
    s.add_argument("--strict", action="store_true",
                   help="fail (exit 1, write nothing) when any sample cannot be converted")

    s = sub.add_parser("check", help="validate every sample of a data.json as training reads it",
                       description="Read every sample as training would (tokenise, resolve and decode images) "
                       "and print each bad one as file:index: reason; the last line counts them. Exit 1 when any "
                       "is bad, 2 when the check could not run.")
    s.add_argument("--mm-data", required=True, help="the data.json (MindSpeed-MM style dataset_param/dataloader_param)")
    s.add_argument("--seq-length", type=int, default=None,
                   help="flag samples longer than this many tokens (default: no length check)")
    s.add_argument("--tokenizer-dir", default=None,
                   help="tokenizer + preprocessor_config.json dir (default: preprocess_parameters.model_name_or_path)")

    s = sub.add_parser("preprocess", help="build the data cache (cache_dir) once, before training",
                       description="Preprocess every sample of a data.json into its basic_parameters.cache_dir, as "
                       "training would (one process builds it, others started at the same time wait for it), so "
                       "that training jobs only read it. Training prints that it reused the cache. With --seq-length "
                       "it also says what training with that length would do with the samples.")
    s.add_argument("--mm-data", required=True, help="the data.json (its cache_dir must be set)")
    s.add_argument("--seq-length", type=int, default=None,
                   help="report too-long samples and rows for this training --seq-length (default: no report)")
    s.add_argument("--tokenizer-dir", default=None,
                   help="tokenizer + preprocessor_config.json dir (default: preprocess_parameters.model_name_or_path)")
    return p


def preprocess(mm_data: str, *, seq_length: int | None = None, tokenizer_dir: str | None = None) -> None:
    from pathlib import Path

    from mmtune.data.config import load_data_config
    from mmtune.data.dataset import build_dataset

    cfg = load_data_config(mm_data)
    if cfg.basic.streaming:
        raise ValueError(f"{mm_data}: streaming: true reads the files lazily during training; there is no cache to "
                         "build (set streaming: false to preprocess once)")
    if not cfg.basic.cache_dir:
        raise ValueError(f"{mm_data}: basic_parameters.cache_dir is not set; set it to where training will read the "
                         "cache (a file system every node sees)")
    tokenizer_dir = tokenizer_dir or cfg.preprocess.model_name_or_path
    if not tokenizer_dir or not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer dir {tokenizer_dir!r} not found (preprocess_parameters.model_name_or_path "
                                "or --tokenizer-dir)")
    prepared = build_dataset(cfg, tokenizer_dir, progress=True)
    print(prepared.note)
    print(f"{len(prepared.good)} good samples, {len(prepared.bad)} bad (skipped by training with on_bad_sample: "
          f"skip; `mmtune data check` names them)")
    if seq_length is not None:
        from mmtune.data.loader import preview_rows

        print(f"with --seq-length {seq_length}: {preview_rows(cfg, prepared, tokenizer_dir, seq_length).summary()}")


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.tool == "make-shapes":
            from mmtune.data.shapes import make_shapes

            path = make_shapes(args.out, num=args.num, seed=args.seed, videos=args.videos)
            print(f"wrote {args.num + args.videos} samples to {path}")
            return 0
        if args.tool == "llava-to-mllm":
            from mmtune.data.llava import llava_to_mllm

            report = llava_to_mllm(args.input, args.output, image_dir=args.image_dir, strict=args.strict)
            for name, reason in report.skipped:
                print(f"skipped {name}: {reason}", file=sys.stderr)
            print(f"{report.summary()}; wrote {args.output}")
            if note := report.outside_note(args.output):
                print(f"note: {note}", file=sys.stderr)
            return 0
        if args.tool == "preprocess":
            if args.seq_length is not None and args.seq_length < 8:
                raise ValueError(f"--seq-length must be >= 8, got {args.seq_length}")
            preprocess(args.mm_data, seq_length=args.seq_length, tokenizer_dir=args.tokenizer_dir)
            return 0
        from mmtune.data.check import check_data

        bad = check_data(args.mm_data, seq_length=args.seq_length, tokenizer_dir=args.tokenizer_dir)
        return 1 if bad else 0
    except (ValueError, FileNotFoundError) as e:
        print(f"mmtune data {args.tool}: error: {e}", file=sys.stderr)
        return 2 if args.tool in ("check", "preprocess") else 1
