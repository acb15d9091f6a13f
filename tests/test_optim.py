"""AdamW param groups and the Megatron LR schedule."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from mmtune.train.optim import build_optimizer, build_optimizer_and_scheduler, build_scheduler, lr_factor, param_groups


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed_tokens = nn.Embedding(10, 4)
        self.q_proj = nn.Linear(4, 4, bias=True)
        self.norm = nn.RMSNorm(4)
        self.experts_gate_up = nn.Parameter(torch.zeros(2, 8, 4))
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("e_score_correction_bias", torch.zeros(2))
        self.lm_head = nn.Linear(4, 10, bias=False)


def test_param_groups_decay_and_frozen():
    groups = param_groups(Block(), weight_decay=0.1)
    decay, no_decay = groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert sorted(decay["names"]) == ["embed_tokens.weight", "experts_gate_up", "lm_head.weight", "q_proj.weight"]
    assert sorted(no_decay["names"]) == ["norm.weight", "q_proj.bias"]
    assert not any("frozen" in n for g in groups for n in g["names"])  # frozen params stay out
    opt = build_optimizer(Block(), lr=1e-3, weight_decay=0.1)
    assert opt.defaults["foreach"] and not opt.defaults["fused"]  # CPU: foreach (fused on CUDA)
    assert [len(g["params"]) for g in opt.param_groups] == [4, 2]
    m = Block()
    m.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        param_groups(m, 0.1)


def megatron_lr(step, *, max_lr, min_lr, warmup, decay, style):
    """Megatron OptimizerParamScheduler.get_lr (init_lr 0), written out independently."""
    if warmup > 0 and step <= warmup:
        return max_lr * step / warmup
    if style == "constant":
        return max_lr
    if step > decay:
        return min_lr
    r = (step - warmup) / (decay - warmup)
    c = 1 - r if style == "linear" else 0.5 * (math.cos(math.pi * r) + 1)
    return min_lr + c * (max_lr - min_lr)


@pytest.mark.parametrize("style", ["cosine", "linear", "constant"])
def test_schedule_values(style):
    p = nn.Parameter(torch.zeros(2, 2))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = build_scheduler(opt, lr=1e-3, min_lr=1e-5, warmup_iters=4, decay_iters=20, decay_style=style)
    seen = []
    for step in range(25):
        seen.append(opt.param_groups[0]["lr"])  # the lr the (step+1)-th optimizer step uses
        opt.step()
        sched.step()
    want = [megatron_lr(s, max_lr=1e-3, min_lr=1e-5, warmup=4, decay=20, style=style) for s in range(25)]
    assert seen == pytest.approx(want, rel=1e-12, abs=1e-15)
    # a few explicit points
    assert seen[0] == 0.0 and seen[2] == pytest.approx(5e-4) and seen[4] == pytest.approx(1e-3)
    if style == "cosine":
        assert seen[12] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # half-way through the decay
    if style == "linear":
        assert seen[16] == pytest.approx(1e-5 + 0.25 * (1e-3 - 1e-5))
    assert seen[24] == pytest.approx(1e-3 if style == "constant" else 1e-5)


def test_scheduler_and_optimizer_resume_from_state_dict():
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    kw = dict(lr=1e-2, min_lr=0.0, warmup_iters=2, decay_iters=10, decay_style="cosine")
    sched = build_scheduler(opt, **kw)
    for _ in range(5):
        model(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    saved_opt, saved_sched = copy.deepcopy(opt.state_dict()), copy.deepcopy(sched.state_dict())  # as if from disk
    assert set(saved_sched) >= {"last_epoch", "base_lrs"} and saved_sched["last_epoch"] == 5

    fresh = nn.Linear(3, 3)
    fresh.load_state_dict(model.state_dict())
    opt2 = build_optimizer(fresh, lr=1e-2, weight_decay=0.1)
    sched2 = build_scheduler(opt2, **kw)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    x = torch.randn(4, 3)
    for m, o, s in ((model, opt, sched), (fresh, opt2, sched2)):
        m(x).sum().backward()
        o.step()
        s.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert sched.get_last_lr() == sched2.get_last_lr()


def test_from_train_config(tmp_path):
    from mmtune.train.args import parse_train_args

    (tmp_path / "model.json").write_text("{}")
    (tmp_path / "data.json").write_text('{"dataset_param": {"basic_parameters": {"dataset": "d.json"}}}')  # validated
    cfg = parse_train_args(["--mm-data", str(tmp_path / "data.json"), "--mm-model", str(tmp_path / "model.json"),
                            "--train-iters", "100", "--lr", "2e-4", "--min-lr", "2e-5", "--lr-warmup-fraction", "0.1",
                            "--lr-decay-style", "cosine", "--weight-decay", "0.05", "--adam-beta2", "0.95"])
    opt, sched = build_optimizer_and_scheduler(Block(), cfg)
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt.param_groups[0]["lr"] == 0.0  # Megatron: the first warmup step runs at lr 0
    assert lr_factor(10, warmup_iters=10, decay_iters=100, decay_style="cosine", lr=2e-4, min_lr=2e-5) == 1.0
    assert lr_factor(100, warmup_iters=10, decay_iters=100, decay_style="cosine", lr=2e-4, min_lr=2e-5) == \
        pytest.approx(0.1)
    with pytest.raises(ValueError, match="step"):
        lr_factor(50, warmup_iters=0, decay_iters=100, decay_style="step", lr=1.0, min_lr=0.0)
