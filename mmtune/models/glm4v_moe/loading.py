"""`from_pretrained` of the GLM-V models: an HF model dir -> a native model, shard by shard.

The model is built on the meta device, cast to the target dtype there (the router's weight and
score-correction bias stay fp32), then materialised once on the target device; each safetensors
shard is read tensor by tensor, hub-layout experts are merged by the model class's state-dict adapter
(`from_hub`, which also checks shapes against config.json; the dense model's only checks), and every tensor is copied into its parameter. The whole
model therefore exists once, plus one layer's experts being stacked. MTP layers
(`layers.{num_hidden_layers}.*`) and names the model does not know are skipped.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from mmtune.weights.hf_files import list_shards

FP32_SUFFIXES = ("mlp.gate.weight", "mlp.gate.e_score_correction_bias")


def load_pretrained(cls, path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", place=None):
    """The model of HF dir `path` in `dtype` on `device`; `place(meta_model)` instead materialises it module
    by module where it says (mmtune/placement.py: layers over several GPUs)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such model dir (expected an HF dir with config.json and safetensors)")
    config = cls.config_class.from_pretrained(path)
    files = [shard.path for shard in list_shards(path)]  # headers checked, missing shards named
    with torch.device("meta"):
        model = cls(config)
    model.to(dtype)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.float()
    if place is not None:
        place(model)
    else:
        model.to_empty(device=device)
    targets = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        targets.pop("lm_head.weight", None)

    current = {"file": files[0]}

    def hub_items() -> Iterator[tuple[str, torch.Tensor]]:
        for file in files:
            current["file"] = file
            with safe_open(str(file), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if _wanted(name, config):
                        yield name, f.get_tensor(name)

    loaded: set[str] = set()
    try:
        with torch.no_grad():
            for name, tensor in cls.adapter_class(config).from_hub(hub_items()):
                target = targets.get(name)
                if target is None:
                    continue  # MTP layer or a tensor the model does not know
                if tuple(tensor.shape) != tuple(target.shape):
                    raise ValueError(
                        f"tensor {name}: shape {tuple(tensor.shape)} disagrees with config.json "
                        f"(expected {tuple(target.shape)})"
                    )
                target.copy_(tensor)
                loaded.add(name)
    except ValueError as e:
        raise ValueError(f"{current['file']}: {e}") from e
    missing = sorted(set(targets) - loaded)
    if missing:
        shown = ", ".join(missing[:10]) + (f", ... ({len(missing)} in all)" if len(missing) > 10 else "")
        raise ValueError(f"{path}: the checkpoint lacks {len(missing)} tensor(s) the model needs: {shown}")
    return model.eval()


def _wanted(name: str, config) -> bool:
    """Skip MTP layers (layers.{>= num_hidden_layers}) before reading them."""
    prefix = "model.language_model.layers."
    if name.startswith(prefix):
        layer = name[len(prefix):].split(".", 1)[0]
        return not layer.isdigit() or int(layer) < config.text.num_hidden_layers
    return True
