"""Expert load of a training step, and aux-loss-free load balancing (the router's correction bias).

Load: for each MoE layer, the (non-pad) tokens each routed expert received in the step — every
micro-batch of the window on every rank (the trainer all-reduces them with the step's other totals).
They are recounted from the router logits the model returns (`TopKRouter.expert_load`: the same
biased, group-limited top-k the forward used), so recomputed blocks (activation checkpointing) are not
counted twice. With expert parallelism the counts are the same: routing happens before the dispatch.

Balancing (DeepSeek-V3's auxiliary-loss-free method, which GLM-4.5 was trained with; Megatron's
`--moe-router-bias-update-rate`): after each optimizer step,
    e_score_correction_bias += rate * sign(mean load - load)
per layer, from the globally summed loads, so every rank applies the same update (EP or not). The bias
only changes which experts are chosen, not the routing weights. It is a persistent buffer: checkpoints
carry it. Off (rate 0) by default for finetuning.
"""

from __future__ import annotations

import torch
from torch import nn

from mmtune.ops.moe import TopKRouter


def routers(model: nn.Module) -> list[TopKRouter]:
    """The MoE routers in layer order (the order of the model output's `router_logits`)."""
    return [m for m in model.modules() if isinstance(m, TopKRouter)]


def expert_loads(gates: list[TopKRouter], router_logits, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Tokens per expert [L, E] (int64) of one forward: `router_logits` [T, E] per MoE layer,
    `token_mask` [B, S] the tokens to count (None: all)."""
    if len(gates) != len(router_logits):
        raise AssertionError(f"{len(gates)} routers but {len(router_logits)} router outputs")
    return torch.stack([g.expert_load(logits, token_mask) for g, logits in zip(gates, router_logits)])


@torch.no_grad()
def update_router_bias(gates: list[TopKRouter], loads: torch.Tensor, rate: float) -> None:
    """bias += rate * sign(mean - load), per layer (loads [L, E], summed over every rank)."""
    loads = loads.to(torch.float64)
    for gate, load in zip(gates, loads):
        step = torch.sign(load.mean() - load) * rate
        gate.e_score_correction_bias.add_(step.to(gate.e_score_correction_bias))


def load_summary(loads: torch.Tensor) -> dict:
    """Metrics of one step's loads [L, E]: the per-layer counts, and the worst layer's max/mean ratio
    (1.0 = perfectly balanced; E/K = every token on the same K experts). Layers count the MoE
    layers only, in order."""
    loads = loads.to(torch.float64)
    ratio = loads.max(-1).values / loads.mean(-1).clamp_min(1e-12)
    worst = int(ratio.argmax())
    return {"moe_load_max_mean": float(ratio[worst]), "moe_load_worst_layer": worst,
            "moe_load_max_mean_per_layer": [round(float(r), 4) for r in ratio],
            "moe_expert_tokens": loads.to(torch.int64).tolist()}
