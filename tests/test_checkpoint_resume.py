"""Checkpointer semantics in one process (no FSDP): what is saved, --no-load-optim / --no-load-rng /
--no-save-optim, refusing a checkpoint of another model, and --load of a converted weights-only DCP."""

from __future__ import annotations


import pytest
import torch

from mmtune.train.checkpoint import Checkpointer, TrainState, checkpoint_keys, resolve_load_path
from mmtune.train.optim import build_optimizer, build_scheduler
from test_train_helpers import ListLoader, collate, full_model, make_sample


def _parts(seed=0):
    model = full_model(seed)
    opt = build_optimizer(model, lr=1e-2, weight_decay=0.1)
    sched = build_scheduler(opt, lr=1e-2, min_lr=1e-3, warmup_iters=2, decay_iters=10, decay_style="cosine")
    return model, opt, sched


def _train(model, opt, sched, steps=3):
    batch = collate([make_sample(0), make_sample(1)])
    for _ in range(steps):
        out = model(batch["input_ids"], pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"])
        out.logits.float().logsumexp(-1).mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()


def test_save_load_flags(tmp_path):
    model, opt, sched = _parts()
    _train(model, opt, sched)
    loader = ListLoader([1, 2, 3])
    next(iter(loader))
    torch.manual_seed(123)
    ck = Checkpointer(tmp_path)
    path = ck.save(3, model, opt, sched, loader, TrainState(step=3, consumed_samples=12))
    expected_rand = torch.rand(3)
    assert path.name == "iter_0000003" and (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "3\n"
    src = resolve_load_path(tmp_path)
    assert (src.kind, src.step, src.path) == ("training", 3, path)

    # full resume: model, AdamW moments, schedule, RNG, loader position
    m2, o2, s2 = _parts(seed=1)
    l2 = ListLoader([1, 2, 3])
    state = Checkpointer.load(path, m2, o2, s2, l2)
    assert (state.step, state.consumed_samples, l2.pos) == (3, 12, 1)
    for (n, a), b in zip(model.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), n
    p0 = next(p for p in model.parameters() if p.requires_grad)
    p0b = next(p for p in m2.parameters() if p.requires_grad)
    assert torch.equal(opt.state[p0]["exp_avg"], o2.state[p0b]["exp_avg"])
    assert s2.last_epoch == 3 and o2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert torch.equal(torch.rand(3), expected_rand)

    # --no-load-optim: fresh moments, schedule still at step 3; --no-load-rng: RNG untouched
    m3, o3, s3 = _parts(seed=1)
    torch.manual_seed(999)
    Checkpointer.load(path, m3, o3, s3, None, load_optim=False, load_rng=False)
    assert not torch.equal(torch.rand(3), expected_rand)
    assert all(not st for st in o3.state.values()) or all(float(st["step"]) == 0 for st in o3.state.values())
    assert s3.last_epoch == 3 and o3.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"])


def test_no_save_optim_and_other_model_refused(tmp_path):
    model, opt, sched = _parts()
    path = Checkpointer(tmp_path, save_optim=False, save_rng=False).save(1, model, opt, sched)
    keys = checkpoint_keys(path)
    assert not any(k.startswith("optim.") for k in keys) and "model.lm_head.weight" in keys
    m2, o2, s2 = _parts()
    with pytest.raises(ValueError, match="--no-load-optim"):
        Checkpointer.load(path, m2, o2, s2)
    Checkpointer.load(path, m2, o2, s2, load_optim=False)  # fine without the optimizer

    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration, tiny_config

    cfg = tiny_config()
    cfg.text.vocab_size = 520
    other = Glm4vMoeForConditionalGeneration(cfg)
    msg = r"tensor model\.model\.language_model\.embed_tokens\.weight has shape \(512, 128\), the model expects \(520, 128\)"
    with pytest.raises(ValueError, match=msg):
        Checkpointer.load(path, other, None, None, load_optim=False)


def test_load_weights_only_dcp(tmp_path, tiny_hf_dir):
    from mmtune.convert import hf_to_dcp
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration

    dcp_dir = tmp_path / "dcp"
    hf_to_dcp(tiny_hf_dir, dcp_dir)
    src = resolve_load_path(dcp_dir)
    assert (src.kind, src.step) == ("weights", 0)
    ref = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir, dtype=torch.float32)
    model = full_model(5)
    Checkpointer.load_weights(dcp_dir, model)
    for (n, a), b in zip(ref.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(FileNotFoundError, match="neither"):
        resolve_load_path(tmp_path)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7\n")
    with pytest.raises(FileNotFoundError, match="iter_0000007"):
        resolve_load_path(tmp_path)
