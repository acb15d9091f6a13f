"""The `mmtune` command: a thin dispatcher. Each sub-command lives in its own module, which exposes
`main(argv: list[str]) -> int` and builds its own argparse parser (prog="mmtune <name>")."""

from __future__ import annotations

import importlib
import sys

# name -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-tiny": ("mmtune.tiny", "write a tiny GLM-V HF model dir (hub layout, tokenizer, processor; --arch glm4v: dense)"),
    "data": ("mmtune.data.cli", "data tools: make-shapes, llava-to-mllm, check, preprocess"),
    "convert": ("mmtune.convert.cli", "checkpoint conversion: hf-to-dcp, dcp-to-hf (expert merge/split; dense: copy)"),
    "train": ("mmtune.train.cli", "finetune (one process, or torchrun -m mmtune train ...)"),
    "generate": ("mmtune.generate", "generate an answer from an HF dir or a training checkpoint"),
    "demo": ("mmtune.demo", "the whole recipe end to end on a tiny model and a synthetic data set"),
    "plan": ("mmtune.plan.cli", "per-GPU memory plan for a model under FSDP2"),
    "plot": ("mmtune.plot", "plot loss / lr / tokens-per-second from metrics.jsonl"),
}


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: mmtune <command> [options]   (mmtune <command> --help for its options)", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from mmtune import __version__

        print(f"mmtune {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mmtune: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
