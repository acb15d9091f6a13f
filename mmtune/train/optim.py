"""AdamW with weight-decay groups, and the LR schedule (Megatron semantics) as a torch LambdaLR.

Weight decay: applied to every trainable parameter with 2 or more dimensions (linear, embedding,
lm-head, router and stacked expert weights); NOT to norms, biases or any other 1-D parameter.
Embeddings keep weight decay, as in Megatron (which skips only biases and norms), so recipe runs
match. Frozen parameters (requires_grad False) are left out of the optimizer entirely; buffers
(the router's e_score_correction_bias) are never parameters.

Both objects are Stateful through their own state_dict()/load_state_dict() (the checkpointer saves them).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Norms, biases and every other 1-D (or scalar) parameter get no weight decay."""
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params, weight_decay, names}] for the trainable parameters: decayed, then not decayed; empty groups dropped."""
    decay, no_decay = ([], []), ([], [])
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = no_decay if is_no_decay(name, p) else decay
        group[0].append(p)
        group[1].append(name)
    groups = [{"params": ps, "weight_decay": wd, "names": names}
              for (ps, names), wd in ((decay, weight_decay), (no_decay, 0.0)) if ps]
    if not groups:
        raise ValueError("no trainable parameters: every module is frozen (model.json freeze flags); "
                         "unfreeze at least one of vision_encoder, vision_projector, text_decoder")
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999),
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over `param_groups`: fused kernel when the parameters live on CUDA, foreach otherwise."""
    groups = [{k: v for k, v in g.items() if k != "names"} for g in param_groups(model, weight_decay)]
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    impl = {"fused": True} if on_cuda else {"foreach": True}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **impl)


def lr_factor(step: int, *, warmup_iters: int, decay_iters: int, decay_style: str, lr: float, min_lr: float) -> float:
    """lr(step) / lr, as Megatron's OptimizerParamScheduler.get_lr with init lr 0: `step` counts the optimizer
    steps already taken (so the first step of a warmup runs at lr 0, as in Megatron).
      warmup  step <= warmup_iters (> 0): lr * step / warmup_iters
      constant: lr;   step > decay_iters: min_lr
      else r = (step - warmup) / (decay_iters - warmup): linear min + (lr - min)(1 - r);
                                                         cosine min + (lr - min)(cos(pi r) + 1) / 2
    """
    if warmup_iters > 0 and step <= warmup_iters:
        return step / warmup_iters
    if decay_style == "constant":
        return 1.0
    if step > decay_iters:
        return min_lr / lr
    ratio = (step - warmup_iters) / max(decay_iters - warmup_iters, 1)
    if decay_style == "linear":
        coeff = 1.0 - ratio
    elif decay_style == "cosine":
        coeff = 0.5 * (math.cos(math.pi * ratio) + 1.0)
    else:
        raise ValueError(f"--lr-decay-style {decay_style!r} is not cosine, linear or constant")
    return (min_lr + coeff * (lr - min_lr)) / lr


def build_scheduler(optimizer: torch.optim.Optimizer, *, lr: float, min_lr: float, warmup_iters: int,
                    decay_iters: int, decay_style: str) -> LambdaLR:
    """LambdaLR applying `lr_factor`; call .step() once after each optimizer step. `lr` must be the
    optimizer's base lr."""
    if lr <= 0:
        raise ValueError(f"--lr must be > 0, got {lr}")
    lr_factor(0, warmup_iters=warmup_iters, decay_iters=decay_iters, decay_style=decay_style, lr=lr, min_lr=min_lr)

    def factor(step: int) -> float:  # a plain function: LambdaLR.state_dict then stores only the step count
        return lr_factor(step, warmup_iters=warmup_iters, decay_iters=decay_iters, decay_style=decay_style,
                         lr=lr, min_lr=min_lr)

    return LambdaLR(optimizer, factor)


def build_optimizer_and_scheduler(model: nn.Module, cfg) -> tuple[torch.optim.AdamW, LambdaLR]:
    """From a TrainConfig (mmtune.train.args)."""
    opt = build_optimizer(model, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    sched = build_scheduler(opt, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.lr_warmup_iters,
                            decay_iters=cfg.lr_decay_iters, decay_style=cfg.lr_decay_style)
    return opt, sched
