"""`mmtune make-tiny`: a tiny GLM-V HF model dir, laid out like the real one of its architecture:
`--arch glm4v_moe` (default) like zai-org/GLM-4.5V, `--arch glm4v` like zai-org/GLM-4.1V-9B-Thinking.

What it writes (deterministic for a seed, a few MB):
- config.json (the architecture's tiny_config(), transformers>=5 style; AutoConfig reads it)
- safetensors in the hub layout (GLM-4.5V: one tensor per expert per projection), bf16 except the
  router's weight and score-correction bias (fp32), in 3 shards + model.safetensors.index.json; for
  GLM-4.5V plus an MTP-style extra layer `model.language_model.layers.{num_hidden_layers}.*` like the
  real checkpoint
- tokenizer.json, tokenizer_config.json, chat_template.jinja (mmtune.data.tokenizer_tiny)
- preprocessor_config.json (GLM image processor; 56x56 images stay 56x56 = 4 LLM tokens)
- generation_config.json (eos ids, pad id)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
from pathlib import Path

import torch

from mmtune.models import ARCHITECTURES, DEFAULT_ARCH, architecture_for_config, get_architecture
from mmtune.weights.hf_files import write_weight_files

NUM_SHARDS = 3
PREPROCESSOR = {
    "image_processor_type": "Glm4vImageProcessor",
    "do_convert_rgb": True, "do_resize": True, "do_rescale": True, "do_normalize": True,
    "resample": 3,  # bicubic
    "rescale_factor": 1 / 255,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],  # OPENAI CLIP
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    # min/max pixels count the temporal patch (2*H*W): 2*28*28 .. 2*224*224, so 56x56 stays 56x56
    "size": {"shortest_edge": 1568, "longest_edge": 100352},
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
}  # fmt: skip


def make_tiny(out_dir: str | os.PathLike, seed: int = 0, arch: str = DEFAULT_ARCH) -> Path:
    """Write the tiny model dir of architecture `arch` (a config.json model_type) to `out_dir` (replaced if
    it exists) and return its path."""
    from mmtune.data.tokenizer_tiny import save_tiny_tokenizer

    out = Path(out_dir)
    cfg = get_architecture(arch).tiny_config()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        cfg.save_pretrained(tmp)
        _write_weights(tmp, hub_state_dict(cfg, seed))
        save_tiny_tokenizer(tmp)
        (tmp / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR, indent=2) + "\n")
        gen = {"eos_token_id": cfg.text.eos_token_id, "pad_token_id": cfg.text.pad_token_id}
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def hub_state_dict(cfg, seed: int) -> list[tuple[str, torch.Tensor]]:
    """Hub-layout tensors of a freshly initialised model (our init_weights) plus the MTP layer(s)."""
    arch = architecture_for_config(cfg)
    model = arch.model_class(cfg)
    model.init_weights(seed)
    native = list(model.state_dict().items())
    native += _mtp_layers(cfg, seed)
    adapter = arch.adapter_class(cfg)
    return [(n, _storage_dtype(n, t)) for name, t in native for n, t in adapter.to_hub(name, t)]


def _mtp_layers(cfg, seed: int) -> list[tuple[str, torch.Tensor]]:
    """MTP-style layers after the last decoder layer, as in the real GLM-4.5V checkpoint: a full MoE
    decoder layer plus eh_proj, enorm, hnorm, shared_head.norm. The model never runs them; they only
    travel along. (The dense GLM-4.1V checkpoint has none.)"""
    t = cfg.text
    if not getattr(t, "num_nextn_predict_layers", 0):
        return []
    from mmtune.models.glm4v_moe.checkpoint_names import StateDictAdapter
    moe_layer = next(i for i in range(t.num_hidden_layers) if t.is_moe_layer(i))
    template = f"model.language_model.layers.{moe_layer}."
    gen = torch.Generator().manual_seed(seed + 1)
    out = []
    for j in range(t.num_nextn_predict_layers):
        prefix = f"model.language_model.layers.{t.num_hidden_layers + j}."
        shapes = {prefix + n[len(template):]: s for n, s in StateDictAdapter(cfg).shapes.items() if n.startswith(template)}
        shapes |= {prefix + "eh_proj.weight": (t.hidden_size, 2 * t.hidden_size), prefix + "enorm.weight": (t.hidden_size,),
                   prefix + "hnorm.weight": (t.hidden_size,), prefix + "shared_head.norm.weight": (t.hidden_size,)}
        for name, shape in shapes.items():
            if name.endswith("norm.weight"):
                x = torch.ones(shape)
            elif name.endswith(("bias", "e_score_correction_bias")):
                x = torch.zeros(shape)
            else:
                x = torch.empty(shape).normal_(0.0, t.initializer_range, generator=gen)
            # stacked experts of the MTP layer go out per expert, like the real checkpoint's
            native_name = template + name[len(prefix):]
            out += [(n.replace(template, prefix, 1), v) for n, v in StateDictAdapter(cfg).to_hub(native_name, x)]
    return out


def _storage_dtype(name: str, t: torch.Tensor) -> torch.Tensor:
    fp32 = name.endswith(("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
    return t.detach().to(torch.float32 if fp32 else torch.bfloat16).contiguous().clone()


def _write_weights(out: Path, tensors: list[tuple[str, torch.Tensor]]) -> None:
    total = sum(t.nbytes for _, t in tensors)
    per_shard = math.ceil(total / NUM_SHARDS)
    shards: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for item in tensors:
        if shards[-1] and size + item[1].nbytes > per_shard and len(shards) < NUM_SHARDS:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1].nbytes
    files = ((f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", [(n, t.dtype, tuple(t.shape)) for n, t in shard],
              iter(shard)) for i, shard in enumerate(shards))
    write_weight_files(out, files, index=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="mmtune make-tiny",
        description="Write a tiny GLM-V HF model dir (hub layout, >=2 safetensors shards + index, bf16 weights "
        "with fp32 router, GLM tokenizer + chat template, image processor config; GLM-4.5V's with an MTP-style "
        "extra layer). Deterministic for a seed; a few MB.",
    )
    p.add_argument("--out", required=True, help="output dir (replaced if it exists; written to a temp dir, then renamed)")
    p.add_argument("--seed", type=int, default=0, help="weight init seed (default 0); same seed, same bytes")
    p.add_argument("--arch", choices=list(ARCHITECTURES), default=DEFAULT_ARCH,
                   help="architecture (config.json model_type): glm4v_moe = GLM-4.5V / GLM-4.6V (MoE, default), "
                   "glm4v = GLM-4.1V / GLM-4.6V-Flash (dense)")
    args = p.parse_args(argv)
    out = make_tiny(args.out, seed=args.seed, arch=args.arch)
    print(f"wrote {out}")
    return 0
