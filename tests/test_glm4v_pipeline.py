"""The dense `glm4v` model through every command: make-tiny (transformers loads it), convert HF -> DCP -> HF
(bit-exact), generate (= transformers' greedy generate), train (loss types, freeze flags, recompute; the
model.json / config.json agreement), plan (the GLM-4.1V / GLM-4.6V-Flash presets)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mmtune.models import get_architecture
from mmtune.models.glm4v import Glm4vForConditionalGeneration, tiny_config


def _tensors(hf_dir) -> dict[str, tuple[torch.dtype, bytes]]:
    from mmtune.weights.hf_files import list_shards
    from mmtune.weights.safetensors_io import iter_tensors

    out = {}
    for shard in list_shards(hf_dir):
        for name, t in iter_tensors(shard.path, shard.entries):
            out[name] = (t.dtype, tuple(t.shape), t.contiguous().view(torch.uint8).numpy().tobytes())
    return out


def test_make_tiny_glm4v_loads_in_transformers_with_no_missing_keys(tiny_dense_hf_dir):
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(tiny_dense_hf_dir)
    assert cfg.model_type == "glm4v"
    hf, info = transformers.Glm4vForConditionalGeneration.from_pretrained(
        tiny_dense_hf_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    index = json.loads((tiny_dense_hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert "model.language_model.layers.1.post_mlp_layernorm.weight" in index["weight_map"]
    # our loader reads the same dir to the same model
    ours = Glm4vForConditionalGeneration.from_pretrained(tiny_dense_hf_dir)
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(ids).logits - hf.eval()(input_ids=ids).logits).abs().max().item()
    assert diff <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(tiny_dense_hf_dir)
    assert tok.convert_tokens_to_ids("<|image|>") == json.loads((tiny_dense_hf_dir / "config.json").read_text())["image_token_id"]


def test_hf_to_dcp_to_hf_is_a_bit_exact_plain_copy(tiny_dense_hf_dir, tmp_path):
    from mmtune.convert.dcp_io import read_metadata
    from mmtune.convert.dcp_to_hf import dcp_to_hf
    from mmtune.convert.hf_to_dcp import hf_to_dcp

    dcp = hf_to_dcp(tiny_dense_hf_dir, tmp_path / "dcp", progress=False, piece_bytes=200_000)  # several pieces
    original = _tensors(tiny_dense_hf_dir)
    assert set(read_metadata(dcp).state_dict_metadata) == set(original)  # native names = hub names
    back = dcp_to_hf(tiny_dense_hf_dir, dcp, tmp_path / "back", max_shard_size="300KB", progress=False)
    assert _tensors(back) == original  # names, dtypes, shapes and bytes
    for name in ("config.json", "tokenizer.json", "preprocessor_config.json", "generation_config.json"):
        assert (back / name).read_bytes() == (tiny_dense_hf_dir / name).read_bytes()


def test_generate_greedy_equals_transformers_generate(tiny_dense_hf_dir):
    import transformers

    from mmtune import generate as G
    from mmtune.data.images import ImageProcessor
    from mmtune.data.shapes import eval_questions
    from test_demo import hf_greedy

    model, hf_dir = G.load_model(tiny_dense_hf_dir)
    assert isinstance(model, Glm4vForConditionalGeneration)
    tok = G.load_tokenizer(hf_dir)
    improc = ImageProcessor.from_pretrained(hf_dir, image_max_pixels=262144, image_min_pixels=1024)
    hf = getattr(transformers, get_architecture("glm4v").hf_class_name).from_pretrained(
        str(tiny_dense_hf_dir), dtype=torch.float32).eval()
    stop = sorted(G.eos_ids(model.config))
    for img, q, _ in eval_questions(2, seed=5):
        gen = G.generate(model, tok, q, [img], image_processor=improc, max_new_tokens=8)
        assert hf_greedy(hf, improc, gen.prompt_ids, img, 8, stop) == gen.token_ids


# ---- training ------------------------------------------------------------------------------------
def _dense_trainer(batches, *, ga=1, loss_type="per_token_loss", recompute=False):
    from mmtune.distributed import init_distributed
    from mmtune.distributed.parallelize import apply_activation_checkpointing
    from mmtune.train.freeze import FreezeSpec, apply_freeze
    from mmtune.train.trainer import LoopSettings, Trainer
    from test_train_helpers import ListLoader, adamw

    env = init_distributed("cpu")
    model = Glm4vForConditionalGeneration(tiny_config())
    model.init_weights(seed=0)
    apply_freeze(model, FreezeSpec(vision_encoder=True, vision_projector=False, text_decoder=False))
    if recompute:
        apply_activation_checkpointing(model)
    opt, sched = adamw(model, sgd=True)
    s = LoopSettings(train_iters=1, grad_accum_steps=ga, loss_type=loss_type, num_experts=None, top_k=None)
    return Trainer(s, env, model, opt, sched, ListLoader(batches))


def _step(samples, mbs, **kw):
    """(loss, grads, model) of one optimizer step over `samples` in micro-batches of mbs (grad-accum)."""
    from test_train_helpers import windows_for

    batches = windows_for(samples, mbs)
    t = _dense_trainer(batches, ga=len(batches), **kw)
    grads = {}
    t.optimizer.step = lambda: grads.update({n: p.grad.clone() for n, p in t.model.named_parameters()
                                             if p.grad is not None})
    r = t.train_step([t._next_batch() for _ in batches])
    return r.loss, grads, t.model


def test_training_step_loss_types_freeze_and_recompute():
    from mmtune.train.args import LOSS_TYPES
    from test_train_helpers import make_sample

    assert tiny_config().image_token_id == get_architecture("glm4v_moe").tiny_config().image_token_id
    samples = [make_sample(i, with_image=i % 2 == 0) for i in range(4)]
    loss_4x1, g_4x1, model = _step(samples, 4)
    loss_1x4, g_1x4, _ = _step(samples, 1)
    assert math.isclose(loss_4x1, loss_1x4, rel_tol=1e-5)  # per_token_loss: the split does not matter
    assert not any(n.startswith("model.visual.blocks") for n in g_4x1)  # vision encoder frozen: no gradient
    assert "model.visual.merger.proj.weight" in g_4x1 and "model.language_model.layers.1.post_mlp_layernorm.weight" in g_4x1
    for name, g in g_4x1.items():
        torch.testing.assert_close(g_1x4[name], g, rtol=1e-4, atol=1e-6, msg=name)
    loss_rc, g_rc, _ = _step(samples, 4, recompute=True)  # activation checkpointing changes nothing
    assert loss_rc == loss_4x1 and all(torch.equal(g_rc[n], g) for n, g in g_4x1.items())
    for loss_type in LOSS_TYPES:
        loss, grads, _ = _step(samples, 2, loss_type=loss_type)
        assert math.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values()), loss_type


def test_mmtune_train_checks_model_json_against_config_json(tiny_dense_hf_dir, shapes_dir, tmp_path, capsys):
    from mmtune.distributed.parallel_dims import ParallelDims
    from mmtune.models import load_config
    from mmtune.train.cli import main
    from test_train_helpers import make_workdir, train_argv

    work = make_workdir(tmp_path, tiny_dense_hf_dir, shapes_dir)  # examples/tiny/model.json: GLM-4.5V's ids
    assert main(train_argv(work, tmp_path / "save", 1)) == 2
    err = capsys.readouterr().err
    assert f"{work / 'model.json'}: model_id 'glm4v_moe' contradicts {tiny_dense_hf_dir}/config.json's model_type " \
           "'glm4v'" in err, err
    model = json.loads((work / "model.json").read_text())
    del model["model_id"], model["image_encoder"]["vision_encoder"]["model_id"], model["text_decoder"]["model_id"]
    model["loss_cfg"]["router_aux_loss_coef"] = 0.01
    (work / "model.json").write_text(json.dumps(model))
    assert main(train_argv(work, tmp_path / "save", 1)) == 2
    assert "router_aux_loss_coef 0.01 needs a model with routed experts" in capsys.readouterr().err
    model["loss_cfg"]["router_aux_loss_coef"] = 0.0
    (work / "model.json").write_text(json.dumps(model))
    assert main(train_argv(work, tmp_path / "save", 1, "--moe-router-bias-update-rate", "0.001")) == 2
    assert "--moe-router-bias-update-rate 0.001 needs a model with routed experts" in capsys.readouterr().err
    # expert parallelism asks the registry how many experts there are: none
    arch, cfg = load_config(tiny_dense_hf_dir)
    with pytest.raises(ValueError, match="expert-model-parallel-size 2 needs a model with routed experts"):
        ParallelDims(2, ep=2).check_model(num_experts=arch.num_experts(cfg))


# ---- plan ----------------------------------------------------------------------------------------
def test_plan_presets_and_estimate_for_the_dense_model(capsys):
    from mmtune import plan as P

    assert P.main(["--model", "glm4.1v-9b", "--gpus", "8", "--seq-length", "8192"]) == 0
    out = capsys.readouterr().out
    assert "10,292,777,472" in out and "fits" in out
    assert P.main(["--model", "glm4.6v-flash", "--gpus", "1"]) == 0
    assert "does NOT fit" in capsys.readouterr().out
    assert P.load_config("glm4.6v")[0].text.n_routed_experts == 128
    # the activation model holds for the dense layer (four norms, fused MLP) as for GLM-4.5V's
    config, B, S = tiny_config(), 2, 1024
    for recompute in ("none", "full"):
        measured = P.measure_training_step(config, micro_batch_size=B, seq_length=S, recompute=recompute)
        est = P.estimate(config, gpus=1, seq_length=S, micro_batch_size=B, recompute=recompute,
                         compute_dtype="fp32", frozen=(), image_patches=16 * B, loss_chunk_size=0)
        assert abs(est.total_bytes / measured["peak"] - 1) < 0.25, (recompute, est.rows, measured)


# ---- demo ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_demo(tmp_path_factory):
    """`mmtune demo --arch glm4v` at a reduced size (400 samples, 250 steps, 48 held-out questions; the
    default demo is 2000 / 600 / 200); main()'s stdout kept."""
    import contextlib
    import io

    from mmtune import demo as D

    work = tmp_path_factory.mktemp("dense_demo") / "work"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = D.main(["--arch", "glm4v", "--workdir", str(work), "--steps", "250", "--num-samples", "400",
                     "--num-eval", "48"])
    assert rc == 0
    return work, out.getvalue()


def test_dense_demo_learns_the_visual_task(dense_demo):
    """The issue's bar, >= 0.9. Measured 1.000 at 250 steps (chance 0.208; 0.917 at 200 steps, 0.44 at 150,
    chance level at 100); the full demo (600 steps) is in README.md and docs/PERFORMANCE.md."""
    import re

    work, stdout = dense_demo
    m = re.fullmatch(r"accuracy=([0-9.]+) chance=([0-9.]+) steps=250 train_s=[0-9.]+ total_s=[0-9.]+",
                     stdout.strip().splitlines()[-1])
    accuracy, chance = float(m.group(1)), float(m.group(2))
    assert accuracy >= 0.9 and accuracy > 2 * chance, (accuracy, chance)
    model_json = json.loads((work / "model.json").read_text())
    assert (model_json["model_id"], model_json["text_decoder"]["model_id"]) == ("glm4v", "glm4v_text")
    assert json.loads((work / "GLM-4.1V-tiny" / "config.json").read_text())["model_type"] == "glm4v"
    rows = [json.loads(line) for line in (work / "save" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows[-1]["loss"] < 0.2 * rows[0]["loss"], (rows[0]["loss"], rows[-1]["loss"])


def test_dense_export_answers_the_same_through_transformers(dense_demo):
    """transformers' Glm4vForConditionalGeneration.from_pretrained(export) + generate() = mmtune's answers."""
    from transformers import Glm4vForConditionalGeneration as HF

    from test_demo import assert_export_answers_like_transformers

    assert_export_answers_like_transformers(dense_demo[0] / "export", HF)


# ---- GLM-4.6V's processor --------------------------------------------------------------------------
GLM46V_PREPROCESSOR = {  # GLM-4.6V / GLM-4.6V-Flash style: the Glm46V classes, GLM-V's size bounds
    "image_processor_type": "Glm46VImageProcessor", "processor_class": "Glm46VProcessor",
    "size": {"shortest_edge": 12544, "longest_edge": 9633792}, "patch_size": 14, "temporal_patch_size": 2,
    "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "do_rescale": True, "do_normalize": True,
}


@pytest.mark.parametrize("arch", ["glm4v", "glm4v_moe"])
def test_glm46v_processor_is_chosen_from_the_model_dir_and_its_images_match_transformers(arch, tmp_path):
    """The processor (GLM-4.6V's video rules or the older ones) comes from the dir's processor files,
    whatever the architecture; a GLM-4.6V dir's images come out as transformers' Glm46VImageProcessorPil
    makes them."""
    import numpy as np
    from PIL import Image
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    from mmtune.data.images import ImageProcessor
    from mmtune.data.video import VideoProcessor

    get_architecture(arch).tiny_config().save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "Glm4vImageProcessor"}))
    assert VideoProcessor.from_pretrained(tmp_path).flavour == "glm4v"
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(GLM46V_PREPROCESSOR))
    assert VideoProcessor.from_pretrained(tmp_path).flavour == "glm46v"

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((700, 1000), (50, 50))]
    pv, grid = ImageProcessor.from_pretrained(tmp_path).process(images)
    settings = {k: v for k, v in GLM46V_PREPROCESSOR.items() if "type" not in k and "class" not in k}
    ref = Glm46VImageProcessorPil(**settings)(images=images, return_tensors="np")
    assert grid.tolist() == ref["image_grid_thw"].tolist() == [[1, 50, 72], [1, 6, 6]]
    assert np.array_equal(pv, ref["pixel_values"])


def test_dense_recipe_example_files_load_and_name_the_dense_architecture():
    from pathlib import Path

    from mmtune.data.config import load_data_config
    from mmtune.models.glm4v import glm41v_config
    from mmtune.train.args import ModelJsonConfig

    ex = Path(__file__).resolve().parents[1] / "examples" / "glm4.1v"
    m = ModelJsonConfig.load(ex / "model_9B.json")
    get_architecture("glm4v").check_model_ids(
        {"model": m.model_id, "vision_encoder": m.image_encoder.vision_encoder.model_id,
         "text_decoder": m.text_decoder.model_id}, "model_9B.json", "config.json")
    real = glm41v_config()
    assert (m.text_decoder.num_layers, m.text_decoder.num_attention_heads) == (real.text.num_hidden_layers, 32)
    assert m.freeze_vision_encoder and not m.freeze_text_decoder
    data = load_data_config(ex / "data_9B.json")
    assert data.preprocess.model_name_or_path == m.init_from_hf_path  # the 9B dir's own tokenizer and processor
