"""Parameter counts of a model, from mmtune's model built on the meta device (shapes only, no memory):
per model.json module, the FSDP units (largest decoder layer, vision block, lm head, root), the routed
experts, and, with LoRA, the adapters `train.lora.apply_lora` adds."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmtune.models import architecture_for_config
from mmtune.train.freeze import MODULES, module_of


def build_meta_model(config) -> torch.nn.Module:
    """mmtune's model of this config's architecture on the meta device: shapes only, no memory."""
    model_class = architecture_for_config(config).model_class
    with torch.device("meta"):
        return model_class(config)


@dataclass
class ParamCounts:
    """Parameter counts of one model, per model.json module, plus the largest FSDP unit of each tower."""

    by_module: dict[str, int]
    largest_decoder_layer: int
    largest_vision_block: int
    lm_head: int
    embed: int
    root: int  # parameters of no block: patch embed, merger, final norms (gathered for the whole step)
    experts: int = 0  # routed-expert parameters (mlp.experts.*) of all MoE layers
    largest_layer_experts: int = 0  # the routed-expert parameters of the largest decoder layer
    decoder_layers: tuple[int, ...] = ()  # parameters of each decoder layer, in order

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


def count_params(model: torch.nn.Module) -> ParamCounts:
    by_module = {m: 0 for m in MODULES}
    for name, p in model.named_parameters():
        by_module[module_of(name)] += p.numel()
    inner = model.model
    layers = [sum(p.numel() for p in layer.parameters()) for layer in inner.language_model.layers]
    layer_experts = [sum(p.numel() for n, p in layer.named_parameters() if n.startswith("mlp.experts."))
                     for layer in inner.language_model.layers]
    blocks = [sum(p.numel() for p in b.parameters()) for b in inner.visual.blocks] or [0]
    lm_head = model.lm_head.weight.numel()
    embed = inner.language_model.embed_tokens.weight.numel()
    total = sum(by_module.values())
    root = total - sum(layers) - sum(blocks) - lm_head - embed
    largest = max(range(len(layers)), key=layers.__getitem__)
    return ParamCounts(by_module, max(layers), max(blocks), lm_head, embed, root, sum(layer_experts),
                       layer_experts[largest], tuple(layers))


@dataclass
class AdapterCounts:
    """LoRA adapters of a model (train/lora.apply_lora on the meta model): parameters per model.json module,
    the largest decoder layer's, and the most adapted Linear modules / expert banks of one decoder layer
    (their [tokens, r] outputs; no banks in a dense model)."""

    by_module: dict[str, int]
    largest_decoder_layer: int
    r: int
    linear_modules_per_layer: int
    expert_banks_per_layer: int

    @property
    def total(self) -> int:
        return sum(self.by_module.values())


def count_adapters(config, lora, frozen: tuple[str, ...]) -> AdapterCounts:
    """Apply LoRA (a train.lora.LoRAConfig) to the meta model with the freeze flags `frozen` and count."""
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.lora import apply_lora

    model = build_meta_model(config)
    info = apply_lora(model, lora, FreezeSpec(**{m: m in frozen for m in MODULES}))
    by_module = {m: 0 for m in MODULES}
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_module[module_of(name)] += p.numel()
    layers = [sum(p.numel() for p in layer.parameters() if p.requires_grad) for layer in model.model.language_model.layers]
    prefix = "model.language_model.layers."
    kinds_by_layer: dict[str, list[str]] = {}  # layer index -> the kinds of its adapted modules
    for name, kind in info.modules.items():
        if name.startswith(prefix):
            kinds_by_layer.setdefault(name[len(prefix):].split(".")[0], []).append(kind)
    linear = max((k.count("linear") for k in kinds_by_layer.values()), default=0)
    banks = max((k.count("experts") for k in kinds_by_layer.values()), default=0)
    return AdapterCounts(by_module, max(layers, default=0), lora.r, linear, banks)
