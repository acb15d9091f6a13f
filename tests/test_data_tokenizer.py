"""The tiny tokenizer: ids, byte-level coverage, AutoTokenizer loading, and the official chat format."""

from __future__ import annotations

import pytest

from mmtune.data.tokenizer_tiny import build_tiny_tokenizer, save_tiny_tokenizer
from mmtune.tokens import SPECIAL_TOKENS, TINY_SPECIAL_BASE, TINY_VOCAB_SIZE


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    assert {p.name for p in d.iterdir()} >= {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    return AutoTokenizer.from_pretrained(d)


def test_ids_and_specials(tok):
    assert build_tiny_tokenizer().to_str() == build_tiny_tokenizer().to_str()  # deterministic
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.convert_tokens_to_ids(t) == TINY_SPECIAL_BASE + i
    assert len(tok) == TINY_SPECIAL_BASE + len(SPECIAL_TOKENS) <= TINY_VOCAB_SIZE
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    ids = tok("x<|user|>y<|image|>", add_special_tokens=False)["input_ids"]
    assert TINY_SPECIAL_BASE + SPECIAL_TOKENS.index("<|user|>") in ids
    assert TINY_SPECIAL_BASE + SPECIAL_TOKENS.index("<|image|>") in ids
    assert max(tok("What color is the shape? red circle", add_special_tokens=False)["input_ids"]) < TINY_SPECIAL_BASE


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト 🙂", "red circle\n\ttab", "[gMASK] not special? <|user"])
def test_any_utf8_roundtrips(tok, text):
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text


MSGS = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q1"}]},
    {"role": "assistant", "content": "<think>R1</think>A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "<think>R2</think>A2"},
]


def test_chat_template_official_format(tok):
    # docs/GLM45V.md section 1, rendered example
    assert tok.apply_chat_template(MSGS, tokenize=False) == (
        "[gMASK]<sop><|system|>\nSYS<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Q1<|assistant|>\n"
        "<think></think>\nA1<|user|>\nQ2<|assistant|>\n<think>R2</think>\nA2"
    )
    assert tok.apply_chat_template(MSGS, tokenize=False, enable_thinking=False) == (
        "[gMASK]<sop><|system|>\nSYS<|user|>\n<|begin_of_image|><|image|><|end_of_image|>Q1/nothink<|assistant|>\n"
        "<think></think>\nA1<|user|>\nQ2/nothink<|assistant|>\n<think>R2</think>\nA2"
    )
    gen = tok.apply_chat_template(MSGS[:2], tokenize=False, add_generation_prompt=True)
    assert gen.endswith("Q1<|assistant|>\n")
    gen = tok.apply_chat_template(MSGS[:2], tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert gen.endswith("Q1/nothink<|assistant|>\n<think></think>\n")
    text_only = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  yo "}]
    assert tok.apply_chat_template(text_only, tokenize=False) == "[gMASK]<sop><|user|>\nhi<|assistant|>\n<think></think>\nyo"
