"""The training loop on the tiny GLM-4.5V, in one process: grad-accum vs one micro-batch, the default
loss's definition, frozen modules, non-finite steps. The 2-rank comparisons are in test_train_dist.py."""

from __future__ import annotations

import math

import pytest
import torch

from mmtune.distributed import init_distributed
from mmtune.train.freeze import FreezeSpec, apply_freeze
from mmtune.train.trainer import LoopSettings, NonFiniteLossError, Trainer
from test_train_helpers import ListLoader, adamw, full_model, make_sample, windows_for

FREEZE = FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False)


def _trainer(batches, *, ga=1, loss_type="per_token_loss", train_iters=1, sgd=False, **kw):
    env = init_distributed("cpu")
    assert not env.distributed
    model = full_model(0)
    apply_freeze(model, FREEZE)
    opt, sched = adamw(model, sgd=sgd)
    s = LoopSettings(train_iters=train_iters, grad_accum_steps=ga, loss_type=loss_type, **kw)
    return Trainer(s, env, model, opt, sched, ListLoader(batches))


def _one_step(samples, mbs, loss_type="per_token_loss"):
    """(loss, grads) of one optimizer step over `samples` split into micro-batches of mbs (grad-accum)."""
    batches = windows_for(samples, mbs)
    t = _trainer(batches, ga=len(batches), loss_type=loss_type)
    grads = {}
    t.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()
                                             if p.grad is not None})
    r = t.train_step([t._next_batch() for _ in range(len(batches))])
    return r.loss, grads


def _close(a, b, rel=1e-5):
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-12)


def test_default_loss_depends_on_the_split():
    """default = mean per micro-batch, then over micro-batches: with unequal token counts the split
    matters (as the recipe defines); per_token_loss above does not."""
    samples = [make_sample(i, seq=16 + 8 * i) for i in range(2)]
    samples = [dict(s, labels=s["labels"]) for s in samples]
    from test_train_helpers import collate

    def loss_for(batches, loss_type):
        t = _trainer(batches, ga=len(batches), loss_type=loss_type)
        return t.train_step([t._next_batch() for _ in batches]).loss

    split = [collate([s]) for s in samples]
    per_mb = [loss_for([b], "default") for b in split]
    assert _close(loss_for(split, "default"), sum(per_mb) / 2)
    n = [int((s["labels"] != -100).sum()) for s in samples]
    assert _close(loss_for(split, "per_token_loss"), (per_mb[0] * n[0] + per_mb[1] * n[1]) / sum(n))


def test_frozen_modules_bit_identical_and_trained_ones_move():
    batches = windows_for([make_sample(i) for i in range(8)], 2)
    t = _trainer(batches, ga=1, train_iters=4, loss_type="default")
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    t.fit(__import__("mmtune.train.checkpoint", fromlist=["TrainState"]).TrainState())
    for name, p in t.model.named_parameters():
        if name.startswith("model.visual.") and not name.startswith(("model.visual.merger", "model.visual.downsample")):
            assert not p.requires_grad
            assert torch.equal(p, before[name]), name
        elif p.requires_grad and "e_score" not in name:
            assert not torch.equal(p, before[name]), f"{name} did not move"
    groups = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert all(p.requires_grad for p in t.model.parameters() if id(p) in groups)


def test_nonfinite_steps_are_skipped_then_stop():
    batches = windows_for([make_sample(i) for i in range(8)], 2)
    t = _trainer(batches, train_iters=10, max_nonfinite_steps=3)
    with torch.no_grad():
        t.model.model.language_model.norm.weight.fill_(float("nan"))
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    from mmtune.train.checkpoint import TrainState

    with pytest.raises(NonFiniteLossError, match="3 steps in a row"):
        t.fit(TrainState())
    assert len(t.losses) == 3 and all(math.isnan(x) for x in t.losses)
    for name, p in t.model.named_parameters():
        assert torch.equal(p, before[name]) or torch.isnan(before[name]).all(), f"{name} changed in a skipped step"


def test_activation_checkpointing_recomputes_blocks_and_keeps_gradients():
    from mmtune.distributed.parallelize import apply_activation_checkpointing

    samples = [make_sample(i) for i in range(2)]
    _, ref = _one_step(samples, 2)
    t = _trainer(windows_for(samples, 2))
    assert apply_activation_checkpointing(t.model, num_layers=2) == 4  # 2 decoder layers + 2 vision blocks
    calls = []
    layers = t.model.model.language_model.layers
    layers[0].register_forward_pre_hook(lambda *a: calls.append(0))
    layers[2].register_forward_pre_hook(lambda *a: calls.append(2))
    grads = {}
    t.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()
                                             if p.grad is not None})
    t.train_step([t._next_batch()])
    assert sorted(calls) == [0, 0, 2]  # layer 0 recomputed in backward, layer 2 (not checkpointed) not
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-8, msg=name)
