"""Tensor names of GLM-4.1V / GLM-4.6V-Flash checkpoints: the hub layout IS the native layout.

The dense model has no experts to merge, so conversion is a plain copy in both directions; the adapter
only checks every known tensor's shape against config.json and that no name appears twice. It has the
same interface as GLM-4.5V's (`mmtune.models.glm4v_moe.checkpoint_names.StateDictAdapter`), so the
converter, the loader and `make-tiny` treat both families alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from mmtune.models.glm4v.config import Glm4vConfig
from mmtune.models.glm4v_moe.checkpoint_names import attention_shapes, vision_shapes

_LAYER_PREFIX = "model.language_model.layers."


def native_shapes(config: Glm4vConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name of the model -> its shape; equal to transformers' `Glm4vForConditionalGeneration
    (config).state_dict()` (pinned by a test)."""
    t = config.text
    H, I = t.hidden_size, t.intermediate_size
    shapes = vision_shapes(config.vision)
    shapes["model.language_model.embed_tokens.weight"] = (t.vocab_size, H)
    for i in range(t.num_hidden_layers):
        p = f"{_LAYER_PREFIX}{i}."
        shapes.update(attention_shapes(t, p))
        shapes[p + "mlp.gate_up_proj.weight"] = (2 * I, H)
        shapes[p + "mlp.down_proj.weight"] = (H, I)
        for norm in ("input_layernorm", "post_attention_layernorm", "post_self_attn_layernorm", "post_mlp_layernorm"):
            shapes[p + f"{norm}.weight"] = (H,)
    shapes["model.language_model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, H)
    return shapes


class StateDictAdapter:
    """Hub <-> native for the dense model: identity, with shape checks."""

    def __init__(self, config: Glm4vConfig):
        self.config = config
        self.shapes = native_shapes(config)

    def from_hub(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield the items as they come; ValueError naming the tensor on a shape that disagrees with
        config.json or a name seen twice. Unknown names (extras) pass through unchecked."""
        seen: set[str] = set()
        for name, tensor in items:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice in the checkpoint")
            seen.add(name)
            self._check_shape(name, tensor)
            yield name, tensor

    def _check_shape(self, name: str, tensor: torch.Tensor) -> None:
        want = self.shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"tensor {name}: shape {tuple(tensor.shape)} disagrees with config.json (expected {want})")

    def to_hub(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        self._check_shape(name, tensor)
        return [(name, tensor)]

    def knows_hub_name(self, name: str) -> bool:
        """True for a tensor the model holds (conversion carries the others over from the original dir)."""
        return name in self.shapes

    def hub_names_and_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        return [(name, tuple(shape))]
