"""`mmtune generate`: chat-template prompt, image expansion, KV-cache decoding equal to transformers' generate,
loading from an HF dir, a converted DCP and a training checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

from mmtune import generate as G
from mmtune.data.images import ImageProcessor
from mmtune.data.shapes import eval_questions
from mmtune.models import load_config


@pytest.fixture(scope="module")
def tiny(tiny_hf_dir):
    model, hf = G.load_model(tiny_hf_dir)
    return model, G.load_tokenizer(hf), ImageProcessor.from_pretrained(hf, image_max_pixels=262144, image_min_pixels=1024)


def _hf_generate(hf_dir, gen: G.Generation, pixel_values, grid, max_new_tokens):
    """transformers' own model and generate() on the same prompt ids and pixels (greedy)."""
    from transformers import Glm4vMoeForConditionalGeneration

    hf = Glm4vMoeForConditionalGeneration.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor([gen.prompt_ids])
    mm_types = (ids == hf.config.image_token_id).long()
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm_types,
                      pixel_values=pixel_values, image_grid_thw=grid, max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=sorted(G.eos_ids(load_config(hf_dir)[1])),
                      pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def test_prompt_uses_chat_template_and_expands_images(tiny):
    model, tok, improc = tiny
    img, q, _ = eval_questions(1, seed=3)[0]
    msgs = G.build_messages(q, 1)
    assert msgs == [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\n" + q}]}]
    ids = G.encode_prompt(tok, msgs, [4], model.config.image_token_id, enable_thinking=False)
    text = tok.decode(ids)
    # the training format of the shapes data (llava "<image>\nQ", enable_thinking false) + generation prompt
    assert text == ("[gMASK]<sop><|user|>\n<|begin_of_image|>" + "<|image|>" * 4 + "<|end_of_image|>\n"
                    + q + "/nothink<|assistant|>\n<think></think>\n")
    with pytest.raises(ValueError, match="2 image"):
        G.build_messages("<image> a", 2)


def test_greedy_generation_equals_transformers_generate(tiny, tiny_hf_dir):
    model, tok, improc = tiny
    img, q, _ = eval_questions(1, seed=5)[0]
    gen = G.generate(model, tok, q, [img], image_processor=improc, max_new_tokens=6)
    assert len(gen.token_ids) == 6 or gen.stopped_on_eos
    pv, grid = improc.process([img])
    theirs = _hf_generate(tiny_hf_dir, gen, torch.from_numpy(pv), torch.from_numpy(grid), 6)
    assert gen.token_ids == theirs


def test_kv_cache_decoding_equals_full_recompute(tiny):
    model, tok, improc = tiny
    img, q, _ = eval_questions(1, seed=9)[0]
    pv, grid = (torch.from_numpy(a) for a in improc.process([img]))
    gen = G.generate(model, tok, q, [img], image_processor=improc, max_new_tokens=5)
    ids = list(gen.prompt_ids)
    with torch.no_grad():
        for expected in gen.token_ids:
            logits = model(torch.tensor([ids]), pixel_values=pv, image_grid_thw=grid).logits[0, -1]
            assert int(logits.argmax()) == expected
            ids.append(expected)


def test_sampling_is_seeded(tiny):
    model, tok, improc = tiny
    a = G.generate(model, tok, "Name the color in: a red circle.", max_new_tokens=5, temperature=1.0, seed=1)
    b = G.generate(model, tok, "Name the color in: a red circle.", max_new_tokens=5, temperature=1.0, seed=1)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="image_processor"):
        G.generate(model, tok, "x", [eval_questions(1)[0][0]])


def test_top_p_keeps_at_least_the_most_likely_token(tiny_hf_dir, capsys):
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    gen = torch.Generator().manual_seed(0)
    assert {G._pick(logits, 1.0, top_p, gen) for top_p in (0.0, 1e-9) for _ in range(20)} == {1}
    assert {G._pick(logits, 1.0, 0.9, gen) for _ in range(200)} == {1, 2, 3}  # the cut drops only id 0 (3%)
    for bad in ("0", "-0.5", "1.5"):
        with pytest.raises(SystemExit):
            G.main(["--model", str(tiny_hf_dir), "--prompt", "x", "--temperature", "1", "--top-p", bad])
        assert "--top-p must be in (0, 1]" in capsys.readouterr().err


def test_generate_from_converted_dcp_and_training_checkpoint(tiny, tiny_hf_dir, tmp_path, capsys):
    import torch.distributed.checkpoint as dcp

    from mmtune.convert.hf_to_dcp import hf_to_dcp

    model, tok, improc = tiny
    prompt = "Name the shape in: a blue square."
    ref = G.generate(model, tok, prompt, max_new_tokens=4).token_ids

    weights = tmp_path / "dcp"
    hf_to_dcp(tiny_hf_dir, weights)
    m2, _ = G.load_model(weights, hf_dir=tiny_hf_dir)
    assert G.generate(m2, tok, prompt, max_new_tokens=4).token_ids == ref

    # a training run: <save>/iter_XXXXXXX with "model."-prefixed weights, the pointer file, model.json
    save = tmp_path / "run"
    dcp.save({"model": model.state_dict()}, checkpoint_id=str(save / "iter_0000007"), no_dist=True)
    (save / "latest_checkpointed_iteration.txt").write_text("7")
    (save / "model.json").write_text(json.dumps({"init_from_hf_path": str(tiny_hf_dir)}))
    m3, hf = G.load_model(save)
    assert hf == tiny_hf_dir
    assert G.generate(m3, tok, prompt, max_new_tokens=4).token_ids == ref

    assert G.main(["--model", str(save / "iter_0000007"), "--hf-dir", str(tiny_hf_dir), "--prompt", prompt,
                   "--max-new-tokens", "4", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.strip() == tok.decode(ref, skip_special_tokens=True).strip()
    with pytest.raises(FileNotFoundError, match="--hf-dir"):
        G.load_model(weights)


def test_batch_generation_equals_one_by_one(tiny):
    """Left-padded batch (prompts of different lengths, with and without images) = single generation."""
    model, tok, improc = tiny
    reqs = [(q, [img]) for img, q, _ in eval_questions(3, seed=11)] + [("Name the color in: a red circle.", [])]
    batch = G.generate_batch(model, tok, reqs, image_processor=improc, max_new_tokens=5)
    single = [G.generate(model, tok, p, ims, image_processor=improc, max_new_tokens=5) for p, ims in reqs]
    assert len({len(g.prompt_ids) for g in single}) > 1
    assert [g.token_ids for g in batch] == [g.token_ids for g in single]
    assert [g.text for g in batch] == [g.text for g in single]


def test_prompt_ids_equal_the_data_pipeline_template(tiny):
    """generate renders with apply_chat_template; training tokenises with mmtune.data.template: same ids."""
    from mmtune.data.template import GlmTemplate

    model, tok, _ = tiny
    template = GlmTemplate(tok, enable_thinking=False)
    for prompt, n_images in [("<image>\nWhat shape is this?", 1), ("Name the shape in: a red cross.", 0)]:
        ours = G.encode_prompt(tok, G.build_messages(prompt, n_images), [4] * n_images,
                               model.config.image_token_id, enable_thinking=False)
        theirs = template.encode_prompt([{"role": "user", "content": prompt}], [4] * n_images)
        assert ours == theirs


def test_video_prompt_and_greedy_generation_equal_transformers(tiny, tiny_hf_dir, tmp_path):
    """`--video`: the prompt expands the video as the processor does; greedy decoding equals
    transformers' generate fed the same pixels (its own video path) and mm_token_type_ids."""
    from transformers import Glm4vMoeForConditionalGeneration

    from mmtune.data.shapes import MOVE_QUESTION, make_shapes
    from mmtune.data.video import VideoProcessor
    from mmtune.models.glm4v_moe.rope import mm_token_types

    model, tok, improc = tiny
    make_shapes(tmp_path, num=1, seed=0, videos=1)
    video = tmp_path / "videos" / "000000.mp4"
    vidproc = VideoProcessor.from_pretrained(tiny_hf_dir)
    gen = G.generate(model, tok, MOVE_QUESTION, videos=[video], video_processor=vidproc, max_new_tokens=4)
    assert tok.decode(gen.prompt_ids) == (
        "[gMASK]<sop><|user|>\n<|begin_of_video|>"
        + "".join(f"<|begin_of_image|>{'<|image|>' * 4}<|end_of_image|>{t}" for t in ("0", "1"))
        + f"<|end_of_video|>\n{MOVE_QUESTION}/nothink<|assistant|>\n<think></think>\n")
    rows, plan = vidproc.process(video)
    hf = Glm4vMoeForConditionalGeneration.from_pretrained(str(tiny_hf_dir), dtype=torch.float32).eval()
    ids = torch.tensor([gen.prompt_ids])
    c = model.config
    types = mm_token_types(ids, image_token_id=c.image_token_id, video_start_token_id=c.video_start_token_id,
                           video_end_token_id=c.video_end_token_id)
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=types,
                      pixel_values_videos=torch.from_numpy(rows), video_grid_thw=torch.tensor([plan.grid]),
                      max_new_tokens=4, do_sample=False, eos_token_id=sorted(G.eos_ids(c)), pad_token_id=0)
    assert gen.token_ids == out[0, ids.shape[1]:].tolist()
    with pytest.raises(ValueError, match="video_processor"):
        G.generate(model, tok, "x", videos=[video])
    with pytest.raises(ValueError, match="1 <video> tag"):
        G.build_messages("<video> a", 0, num_videos=2)
    assert G.main(["--model", str(tiny_hf_dir), "--prompt", MOVE_QUESTION, "--video", str(video),
                   "--max-new-tokens", "2", "--device", "cpu"]) == 0
