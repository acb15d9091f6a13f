"""model.json freeze flags: which parameters train (the recipe's three switches)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class FreezeSpec:
    """model.json freeze flags (recipe defaults: vision encoder and projector frozen, text trained)."""

    vision_encoder: bool = True
    vision_projector: bool = True
    text_decoder: bool = False  # decoder + embeddings + final norm + lm head


# The recipe's model.json freeze switches and the parameters each owns. The vision projector is the 2x2
# downsample conv and the merger (MindSpeed-MM's "lnmlp" projector); the rest of model.visual is the
# vision encoder; the text decoder is embeddings + decoder layers + final norm + lm head.
MODULES = ("vision_encoder", "vision_projector", "text_decoder")
VISION_PROJECTOR_PREFIXES = ("model.visual.downsample.", "model.visual.merger.")


def module_of(name: str) -> str:
    """The model.json module that owns parameter `name` (a native name)."""
    if name.startswith(VISION_PROJECTOR_PREFIXES):
        return "vision_projector"
    if name.startswith("model.visual."):
        return "vision_encoder"
    return "text_decoder"


def apply_freeze(model: nn.Module, spec: FreezeSpec) -> dict[str, int]:
    """Set requires_grad per the freeze flags; returns {"trainable": n, "frozen": n} parameter counts."""
    counts = {"trainable": 0, "frozen": 0}
    for name, p in model.named_parameters():
        p.requires_grad_(not getattr(spec, module_of(name)))
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts
