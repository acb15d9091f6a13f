"""`mmtune convert hf-to-dcp|dcp-to-hf` and the recipe's `mm-convert ExpertMergeDcpConverter hf_to_dcp|dcp_to_hf`."""

from __future__ import annotations

import argparse
import sys

_CONVERTER = "ExpertMergeDcpConverter"


def _parser(prog: str, hf_to_dcp_name: str, dcp_to_hf_name: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Convert GLM-V checkpoints between an HF dir in hub layout and a torch.distributed.checkpoint "
        "(DCP) with native names, streaming. The architecture comes from config.json's model_type: GLM-4.5V / "
        "GLM-4.6V (glm4v_moe) have one tensor per expert on the hub and merged experts in the DCP; the dense "
        "GLM-4.1V / GLM-4.6V-Flash (glm4v) are copied as they are.",
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{%s,%s}" % (hf_to_dcp_name, dcp_to_hf_name))
    a = sub.add_parser(hf_to_dcp_name, help="HF dir -> DCP (merges each MoE layer's experts; dense models: a plain copy)")
    a.add_argument("--hf-dir", "--hf_dir", dest="hf_dir", required=True,
                   help="HF model dir: config.json + safetensors (index json or model.safetensors)")
    a.add_argument("--save-dir", "--save_dir", dest="save_dir", required=True,
                   help="output DCP dir (must not exist or be empty; written under a temporary name, then renamed)")
    b = sub.add_parser(dcp_to_hf_name, help="DCP -> HF dir (splits experts back to the hub layout; dense models: a plain copy)")
    b.add_argument("--hf-dir", "--hf_dir", dest="hf_dir", required=True,
                   help="the original HF dir: its config.json defines the model; its tokenizer, processor, chat "
                   "template, generation config (every non-weight file) are copied; its tensors the DCP lacks "
                   "and the model does not use (the MTP layer) are copied too")
    b.add_argument("--dcp-dir", "--dcp_dir", dest="dcp_dir", required=True,
                   help="a converted DCP dir, a training checkpoint <save>/iter_XXXXXXX, or a training save dir "
                   "with latest_checkpointed_iteration.txt (then its latest checkpoint); only model weights are exported")
    b.add_argument("--save-dir", "--save_dir", dest="save_dir", required=True,
                   help="output HF dir (must not exist or be empty; written under a temporary name, then renamed)")
    b.add_argument("--max-shard-size", "--max_shard_size", dest="max_shard_size", default="4GB",
                   help="largest safetensors shard, e.g. 4GB, 500MB, 2GiB (default 4GB)")
    b.add_argument("--dtype", choices=("keep", "hf"), default="keep",
                   help="keep: the checkpoint's dtypes (default; a merged LoRA run: adapted tensors fp32, the rest as "
                   "in --hf-dir); hf: each tensor in the dtype it has in --hf-dir (e.g. fp32 training weights back "
                   "to bf16, router kept fp32)")
    b.add_argument("--adapter-only", "--adapter_only", dest="adapter_only", action="store_true",
                   help="for a LoRA run: write a PEFT adapter dir (adapter_config.json + adapter_model.safetensors) "
                   "for --hf-dir's model instead of the merged model (the default). transformers + PEFT load it; "
                   "vLLM does not read its routed-expert adapters correctly: serve the merged model there")
    for q in (a, b):
        q.add_argument("--force", action="store_true", help="replace a non-empty output dir (deletes its contents)")
        q.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _run(args: argparse.Namespace, hf_to_dcp_name: str) -> int:
    from mmtune.convert.dcp_to_hf import dcp_to_hf
    from mmtune.convert.hf_to_dcp import hf_to_dcp

    try:
        if args.cmd == hf_to_dcp_name:
            out = hf_to_dcp(args.hf_dir, args.save_dir, force=args.force, progress=not args.no_progress)
        elif args.adapter_only:
            out = _adapter_only(args)
        else:
            out = dcp_to_hf(args.hf_dir, args.dcp_dir, args.save_dir, max_shard_size=args.max_shard_size,
                            force=args.force, dtype=args.dtype, progress=not args.no_progress)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


def _adapter_only(args: argparse.Namespace):
    from pathlib import Path

    from mmtune.convert.dcp_io import resolve_dcp_dir
    from mmtune.convert.lora_export import lora_info, peft_export

    ckpt = resolve_dcp_dir(args.dcp_dir)
    info = lora_info(ckpt)
    if info is None:
        raise ValueError(f"--adapter-only: {ckpt} is not a LoRA checkpoint (it holds full weights); drop "
                         "--adapter-only to export the model")
    return peft_export(Path(args.hf_dir), ckpt, Path(args.save_dir), info, force=args.force)


def main(argv: list[str] | None = None) -> int:
    """`mmtune convert hf-to-dcp ...` / `mmtune convert dcp-to-hf ...`."""
    args = _parser("mmtune convert", "hf-to-dcp", "dcp-to-hf").parse_args(argv)
    return _run(args, "hf-to-dcp")


def mm_convert_main(argv: list[str] | None = None) -> int:
    """The recipe's spelling: `mm-convert ExpertMergeDcpConverter hf_to_dcp --hf_dir H --save_dir D`."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != _CONVERTER:
        if argv and argv[0] in ("-h", "--help"):
            print(f"usage: mm-convert {_CONVERTER} {{hf_to_dcp,dcp_to_hf}} [options]   (mm-convert {_CONVERTER} -h)")
            return 0
        print(f"mm-convert: the only converter is {_CONVERTER} (got {argv[:1]})", file=sys.stderr)
        return 2
    args = _parser(f"mm-convert {_CONVERTER}", "hf_to_dcp", "dcp_to_hf").parse_args(argv[1:])
    return _run(args, "hf_to_dcp")


if __name__ == "__main__":
    sys.exit(mm_convert_main())
