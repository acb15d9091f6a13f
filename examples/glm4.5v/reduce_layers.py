"""Write a reduced-layer copy of a GLM-4.5V HF dir, for debugging the recipe on ONE node.

The recipe says that one node only runs the model with fewer layers. This keeps the first
--num-layers decoder layers (and optionally the first --vision-depth vision blocks), drops the MTP
layer, and copies only the kept tensors, shard by shard (one shard in memory at a time). The result
is an ordinary HF dir (hub layout, tokenizer and processor files copied) that `mm-convert`,
`mmtune train` and transformers read like the original.

    python examples/glm4.5v/reduce_layers.py --hf-dir ckpt/hf_path/GLM-4.5V \
        --out ckpt/hf_path/GLM-4.5V-4layers --num-layers 4
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

_TEXT_LAYER = re.compile(r"(?:^|\.)language_model\.layers\.(\d+)\.")
_VISION_BLOCK = re.compile(r"(?:^|\.)visual\.blocks\.(\d+)\.")


def keep(name: str, num_layers: int, vision_depth: int | None) -> bool:
    m = _TEXT_LAYER.search(name)
    if m and int(m.group(1)) >= num_layers:  # later decoder layers and the MTP layer
        return False
    m = _VISION_BLOCK.search(name)
    return not (m and vision_depth is not None and int(m.group(1)) >= vision_depth)


def reduce_layers(hf_dir: str | Path, out: str | Path, num_layers: int, vision_depth: int | None = None) -> Path:
    hf_dir, out = Path(hf_dir), Path(out)
    cfg_file, index_file = hf_dir / "config.json", hf_dir / "model.safetensors.index.json"
    for f in (cfg_file, index_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f}: missing (expected an HF dir with sharded safetensors)")
    config = json.loads(cfg_file.read_text())
    text = config["text_config"]
    if not 1 <= num_layers <= text["num_hidden_layers"]:
        raise ValueError(f"--num-layers {num_layers}: must be in 1..{text['num_hidden_layers']} ({cfg_file})")
    if vision_depth is not None and not 1 <= vision_depth <= config["vision_config"]["depth"]:
        raise ValueError(f"--vision-depth {vision_depth}: must be in 1..{config['vision_config']['depth']}")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out}: exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    weight_map = json.loads(index_file.read_text())["weight_map"]
    new_map, total = {}, 0
    for shard in tqdm(sorted(set(weight_map.values())), desc="shards", unit="shard"):
        names = [n for n, s in weight_map.items() if s == shard and keep(n, num_layers, vision_depth)]
        if not names:
            continue
        with safe_open(hf_dir / shard, framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in names}
        save_file(tensors, out / shard, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        new_map.update({n: shard for n in names})
    (out / index_file.name).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": new_map}, indent=2))
    text["num_hidden_layers"] = num_layers
    text["num_nextn_predict_layers"] = 0
    if vision_depth is not None:
        config["vision_config"]["depth"] = vision_depth
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in hf_dir.iterdir():  # tokenizer, chat template, processor, generation config
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in ("config.json", index_file.name):
            shutil.copy2(f, out / f.name)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Copy a GLM-4.5V HF dir keeping only the first layers (one-node debugging).")
    ap.add_argument("--hf-dir", required=True, help="the original HF dir (e.g. ckpt/hf_path/GLM-4.5V)")
    ap.add_argument("--out", required=True, help="new, empty directory for the reduced copy")
    ap.add_argument("--num-layers", type=int, required=True,
                    help="decoder layers to keep (layer 0 is dense, the rest MoE); the MTP layer is dropped")
    ap.add_argument("--vision-depth", type=int, default=None, help="vision blocks to keep (default: all)")
    args = ap.parse_args(argv)
    print(reduce_layers(args.hf_dir, args.out, args.num_layers, args.vision_depth))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
