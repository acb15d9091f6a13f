"""template.py: token-for-token equal to the tokenizer's apply_chat_template; labels per docs/GLM45V.md section 6."""

from __future__ import annotations

import pytest

from mmtune.data.template import IGNORE, BadSample, GlmTemplate
from mmtune.data.tokenizer_tiny import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def _parts(content):
    out = []
    for i, seg in enumerate(content.split("<image>")):
        if i:
            out.append({"type": "image"})
        if seg:
            out.append({"type": "text", "text": seg})
    return out


def _reference(tok, messages, image_tokens, **kw):
    """apply_chat_template on list-content messages, + the trailing <|user|>, <|image|> expanded."""
    hf = [{"role": m["role"], "content": _parts(m["content"]) if m["role"] == "user" else m["content"]} for m in messages]
    ids = tok.apply_chat_template(hf, tokenize=True, **kw)["input_ids"] + [tok.convert_tokens_to_ids("<|user|>")]
    image_id, counts, out = tok.convert_tokens_to_ids("<|image|>"), iter(image_tokens), []
    for t in ids:
        out += [t] * next(counts) if t == image_id else [t]
    return out


CASES = {
    "multi_turn_system_images": ([
        {"role": "system", "content": "You are helpful. Ünïcode ✓"},
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "<think>It looks warm.</think>red"},
        {"role": "user", "content": "And this one <image> here?"},
        {"role": "assistant", "content": "<think>\nRound.\n</think>\n\n circle "},
    ], [4, 9]),
    "text_only": ([{"role": "user", "content": "Name the color in: a red circle."}, {"role": "assistant", "content": "red"}], []),
    "three_turns": ([
        {"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b?"}, {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d?"}, {"role": "assistant", "content": "e f"},
    ], [1]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("thinking", [True, False])
def test_equals_apply_chat_template(tok, name, thinking):
    messages, images = CASES[name]
    enc = GlmTemplate(tok, enable_thinking=thinking).encode(messages, images)
    assert enc.input_ids == _reference(tok, messages, images, enable_thinking=thinking)
    assert len(enc.labels) == len(enc.input_ids)


def _trained_text(tok, enc):
    """Decoded trained spans, '|' between spans."""
    spans, cur = [], []
    for t, lab in zip(enc.input_ids, enc.labels):
        if lab == IGNORE:
            if cur:
                spans.append(tok.decode(cur))
                cur = []
        else:
            assert lab == t
            cur.append(t)
    if cur:
        spans.append(tok.decode(cur))
    return spans


def test_labels_default_train_on_prompt_mask_history(tok):
    messages, images = CASES["three_turns"]
    spans = _trained_text(tok, GlmTemplate(tok).encode(messages, images))
    assert spans == ["\n<think></think>\na<|user|>", "\n<think></think>\nc<|user|>", "\n<think></think>\ne f<|user|>"]
    spans = _trained_text(tok, GlmTemplate(tok, mask_history=True).encode(messages, images))
    assert spans == ["\n<think></think>\ne f<|user|>"]
    enc = GlmTemplate(tok, train_on_prompt=True).encode(messages, images)
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert all((lab == IGNORE) == (t == image_id) for t, lab in zip(enc.input_ids, enc.labels))
    enc = GlmTemplate(tok, train_on_prompt=True, mask_history=True).encode(messages, images)
    assert _trained_text(tok, enc) == ["\nd?<|assistant|>\n<think></think>\ne f<|user|>"]
    nothink = GlmTemplate(tok, enable_thinking=False).encode(messages, images)
    assert "b?/nothink<|assistant|>" in tok.decode(nothink.input_ids)


@pytest.mark.parametrize("messages,images,reason", [
    ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], [], "not from the user"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}], [], "empty assistant turn"),
    ([{"role": "user", "content": "<image><image>q"}, {"role": "assistant", "content": "a"}], [4], "2 <image> tags for 1 images"),
    ([{"role": "user", "content": "q"}], [], "last turn"),
    ([{"role": "user", "content": "q"}, {"role": "user", "content": "q"}], [], "expected 'assistant'"),
    ([{"role": "user", "content": "<|image|> q"}, {"role": "assistant", "content": "a"}], [], "more"),
])
def test_bad_conversations(tok, messages, images, reason):
    with pytest.raises(BadSample, match=reason):
        GlmTemplate(tok).encode(messages, images)


@pytest.mark.parametrize("thinking", [True, False])
def test_generation_prompt_equals_apply_chat_template(tok, thinking):
    messages, images = CASES["multi_turn_system_images"]
    prompt = messages[:-1]
    hf = [{"role": m["role"], "content": _parts(m["content"]) if m["role"] == "user" else m["content"]} for m in prompt]
    ref = tok.apply_chat_template(hf, tokenize=True, add_generation_prompt=True, enable_thinking=thinking)["input_ids"]
    image_id, counts, expanded = tok.convert_tokens_to_ids("<|image|>"), iter(images), []
    for t in ref:
        expanded += [t] * next(counts) if t == image_id else [t]
    assert GlmTemplate(tok, enable_thinking=thinking).encode_prompt(prompt, images) == expanded
