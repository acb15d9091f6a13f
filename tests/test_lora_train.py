"""LoRA training: `mmtune train --lora-r` end to end on the tiny model (adapter-only checkpoints, exact resume,
--lora-load continuing a run, user errors), the frozen base bit-identical after AdamW steps with weight
decay, and 2-rank FSDP2 == 1 rank plus bf16 storage of the frozen base (one torchrun launch, lora_worker.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dist_utils import torchrun
from mmtune.train.checkpoint import checkpoint_keys
from mmtune.train.cli import main
from test_train_helpers import make_workdir, train_argv, windows_for

HERE = Path(__file__).parent
LORA_FLAGS = ("--lora-r", "4", "--lora-alpha", "8")


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_hf_dir, shapes_dir):
    return make_workdir(tmp_path_factory.mktemp("lora_train"), tiny_hf_dir, shapes_dir)


def _losses(save):
    return [json.loads(line)["loss"] for line in (Path(save) / "metrics.jsonl").read_text().splitlines()]


def _adapters(ckpt) -> dict[str, torch.Tensor]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()
          if isinstance(m, TensorStorageMetadata) and "lora_" in k and k.startswith("model.")}
    dcp.load(sd, checkpoint_id=str(ckpt), no_dist=True)
    return sd


def test_lora_run_resumes_exactly_and_saves_only_adapters(work):
    straight, resumed = work / "straight", work / "resumed"
    assert main(train_argv(work, straight, 3, *LORA_FLAGS)) == 0
    assert main(train_argv(work, resumed, 3, "--exit-interval", "2", *LORA_FLAGS)) == 0
    assert main(train_argv(work, resumed, 3, "--load", str(resumed), *LORA_FLAGS)) == 0
    a, b = _losses(straight), _losses(resumed)
    assert len(a) == 3 and a == b  # bit-identical in fp32
    assert a[-1] < a[0]
    last_a, last_b = _adapters(straight / "iter_0000003"), _adapters(resumed / "iter_0000003")
    assert last_a.keys() == last_b.keys() and all(torch.equal(last_a[k], last_b[k]) for k in last_a)
    keys = checkpoint_keys(straight / "iter_0000003")
    model_keys = {k for k in keys if k.startswith("model.")}
    assert model_keys and all("lora_" in k or k.endswith("e_score_correction_bias") for k in model_keys)
    assert any("mlp.experts.gate_up_proj_lora_A" in k for k in model_keys)
    assert not any("visual.blocks" in k for k in model_keys)  # model.json freezes the vision encoder: no adapters
    assert any("visual.merger" in k for k in model_keys)  # ... but trains the projector
    optim = [k for k in keys if k.startswith("optim.state.")]
    assert optim and all("lora_" in k for k in optim)
    assert "lora" in keys
    size = sum(f.stat().st_size for f in (straight / "iter_0000003").iterdir())
    base = sum(f.stat().st_size for f in Path(json.loads((work / "model.json").read_text())["init_from_hf_path"])
               .glob("*.safetensors"))
    assert size < base / 2, (size, base)  # adapters + their AdamW state, not the model


def test_resume_with_lora_dropout_is_exact(work):
    """Dropout draws from the generator the checkpoint restores: the resumed run draws the same masks."""
    flags = (*LORA_FLAGS, "--lora-dropout", "0.2")
    straight, resumed = work / "dropout_straight", work / "dropout_resumed"
    assert main(train_argv(work, straight, 3, *flags)) == 0
    assert main(train_argv(work, resumed, 3, "--exit-interval", "2", *flags)) == 0
    assert main(train_argv(work, resumed, 3, *flags)) == 0
    assert _losses(straight) == _losses(resumed)


def test_lora_load_continues_a_run(work):
    straight = work / "straight"
    if not (straight / "iter_0000003").is_dir():
        pytest.skip("needs test_lora_run_resumes_exactly_and_saves_only_adapters first")
    cont = work / "continued"
    # flags left out take the adapter's settings; the first step runs at lr 0 (1 warmup step), so the
    # saved adapters are the loaded ones unchanged
    assert main(train_argv(work, cont, 1, "--lora-load", str(straight))) == 0
    loaded, saved = _adapters(straight / "iter_0000003"), _adapters(cont / "iter_0000001")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in loaded)
    # the same first batch as the fresh run, with trained adapters: a lower loss
    assert _losses(cont)[0] < _losses(straight)[0]
    # the same command again after the run saved (a relaunch after a failure): it resumes the run's own
    # checkpoint, --lora-load having only started it; the losses are those of the uninterrupted run
    relaunched = work / "continued_relaunched"
    argv = train_argv(work, relaunched, 2, "--lora-load", str(straight))
    assert main([*argv, "--exit-interval", "1"]) == 0 and main(argv) == 0
    assert main(train_argv(work, work / "continued_2", 2, "--lora-load", str(straight))) == 0
    assert _losses(relaunched) == _losses(work / "continued_2")


def test_user_errors(work, tmp_path, capsys, tiny_hf_dir):
    def err(*flags):
        assert main(train_argv(work, tmp_path / "x", 1, *flags)) == 2
        return capsys.readouterr().err

    assert "--lora-r must be an integer >= 1" in err("--lora-r", "0")
    e = err("--lora-r", "2", "--lora-target-modules", "q_proj", "attn")
    assert "--lora-target-modules attn: no module of this model has that name; valid:" in e and "experts" in e
    assert "image_encoder.vision_encoder.freeze true" in err("--lora-r", "2", "--lora-target-modules", "qkv")
    assert "need --lora-r" in err("--lora-alpha", "4")
    # an adapter trained for another model
    from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration
    from mmtune.train.checkpoint import Checkpointer
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.lora import LoRAConfig, apply_lora, lora_modules, metadata
    from test_model import config_b

    other = Glm4vMoeForConditionalGeneration(config_b())
    other.init_weights(0)
    cfg = LoRAConfig(r=4, alpha=8.0)
    apply_lora(other, cfg, FreezeSpec())
    Checkpointer(tmp_path / "other", lora=metadata(cfg, lora_modules(other))).save(1, other)
    assert "another model" in err("--lora-load", str(tmp_path / "other"))
    assert "disagrees with the adapter being continued (--lora-r 4)" in err("--lora-load", str(tmp_path / "other"),
                                                                            "--lora-r", "8")
    from mmtune.convert import hf_to_dcp

    hf_to_dcp(tiny_hf_dir, tmp_path / "dcp", progress=False)
    assert "not a LoRA checkpoint" in err("--lora-load", str(tmp_path / "dcp"))
    # an adapter with more than this run has places for: trained with the vision tower unfrozen, loaded into
    # a run whose model.json freezes it (its vision adapters would be dropped: another model)
    vision = Glm4vMoeForConditionalGeneration.from_pretrained(tiny_hf_dir)
    apply_lora(vision, cfg, FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False))
    Checkpointer(tmp_path / "vision", lora=metadata(cfg, lora_modules(vision))).save(1, vision)
    e = err("--lora-load", str(tmp_path / "vision"))
    assert "adapter tensors this run has no place for" in e and "visual.blocks" in e, e


# --------------------------------------------------------------------------------------- 2 ranks


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora_dist") / "result.json"
    torchrun([str(HERE / "lora_worker.py"), str(out)], nproc=2, env={"PYTHONPATH": f"{HERE}:{HERE.parent}"})
    return json.loads(out.read_text())


def test_two_ranks_fsdp_lora_equals_one_rank_and_the_base_stays(dist):
    from mmtune.distributed import init_distributed
    from lora_worker import lora_trainer, steps

    trainer = lora_trainer(init_distributed("cpu"), [windows_for(s, 4)[0] for s in steps()], sgd=False)
    # 1 rank with AdamW + weight decay: the frozen base must not move at all
    base = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" not in n}
    trainer.optimizer.param_groups[0]["weight_decay"] = 0.1
    for _ in range(3):
        trainer.train_step([trainer._next_batch()])
    after = dict(trainer.model.named_parameters())
    assert all(torch.equal(after[n], p) for n, p in base.items())
    assert any(after[n].abs().sum() > 0 for n in after if n.endswith("lora_B"))
    # the 2-rank SGD run against 1 rank
    trainer = lora_trainer(init_distributed("cpu"), [windows_for(s, 4)[0] for s in steps()])
    for _ in range(3):
        trainer.losses.append(trainer.train_step([trainer._next_batch()]).loss)
    sd = trainer.model.state_dict()
    for run in ("fsdp", "ep2"):  # FSDP2 over 2 ranks, and the same with the experts split over them (EP=2)
        ref = dist[run]
        assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(trainer.losses, ref["losses"])), (run, trainer.losses, ref)
        assert set(ref["adapters"]) == {k for k in sd if "lora_" in k}
        assert any(".experts." in k for k in ref["adapters"]), "the routed experts carry adapters"
        for name, value in ref["adapters"].items():
            torch.testing.assert_close(sd[name], torch.tensor(value), rtol=1e-4, atol=1e-6, msg=f"{run}: {name}")


def test_bf16_keeps_the_frozen_base_in_bf16_and_adapters_in_fp32(dist):
    got = dist["bf16"]
    assert got["dtypes"] == {"adapter": ["torch.float32"], "router": ["torch.float32"], "base": ["torch.bfloat16"]}
    assert got["optim_params"] == ["adapter"] and got["optim_dtypes"] == ["torch.float32"] and got["finite"]


# --------------------------------------------------------------------------------------- plan, demo


def test_plan_puts_glm45v_lora_on_one_node():
    from mmtune.models.glm4v_moe import glm45v_config
    from mmtune.plan import count_adapters, estimate
    from mmtune.train.lora import LoRAConfig

    cfg, frozen = glm45v_config(), ("vision_encoder", "vision_projector")
    adapters = count_adapters(cfg, LoRAConfig(r=16), frozen)
    assert adapters.by_module["vision_encoder"] == 0 and adapters.total > 1e9  # every routed expert adapted
    for mem in (80, 141):
        lora = estimate(cfg, gpus=8, gpu_mem_gib=mem, seq_length=8192, frozen=frozen, adapters=adapters)
        full = estimate(cfg, gpus=8, gpu_mem_gib=mem, seq_length=8192, frozen=frozen)
        assert lora.fits and not full.fits, (mem, lora.total_bytes / 2**30, full.total_bytes / 2**30)
        assert lora.rows["base parameters (frozen, bf16 shards)"] == 2 * lora.params.total / 8


def test_demo_with_lora_learns(tmp_path):
    import contextlib
    import io
    import re

    from mmtune import demo as D

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert D.main(["--workdir", str(tmp_path / "w"), "--lora", "--steps", "50", "--num-samples", "160",
                       "--num-eval", "16"]) == 0
    stdout = out.getvalue()
    assert "LoRA r=16, 50 steps" in stdout and "the adapters merged into the base" in stdout
    assert re.fullmatch(r"accuracy=[0-9.]+ chance=[0-9.]+ steps=50 train_s=[0-9.]+ total_s=[0-9.]+",
                        stdout.strip().splitlines()[-1])
    save = tmp_path / "w" / "save"
    rows = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])
    assert all("lora_" in k or "e_score" in k for k in checkpoint_keys(save / "iter_0000050") if k.startswith("model."))


def test_one_node_lora_launch_script_parses(monkeypatch):
    from mmtune.train.args import parse_train_args
    from test_demo import RECIPE, ROOT, _script_flags

    flags = _script_flags(RECIPE / "finetune_glm4_5v_lora_1node.sh")
    monkeypatch.chdir(ROOT)
    cfg = parse_train_args(flags, world_size=8)
    lora = cfg.lora_config()
    assert (lora.r, lora.alpha, lora.dropout, lora.targets) == (16, 32.0, 0.0, ("all-linear",))
    assert cfg.fsdp2.param_dtype == "bf16" and cfg.recompute_granularity == "full" and cfg.seq_length == 8192
    assert cfg.grad_accum_steps == 8 and cfg.model.freeze_vision_encoder

