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


TOOL_MSGS = [
    {"role": "system", "content": "SYS"},
    {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Q1"}]},
    {"role": "assistant", "content": "<think>R0</think>Checking.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
    {"role": "tool", "content": "sunny"},
    {"role": "tool", "content": "rain"},
    {"role": "assistant", "content": "A1", "reasoning_content": "R1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "content": "<think>R2</think>A2"},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
# docs/GLM45V.md section 7: what the official GLM-V chat_template.jinja renders for TOOL_MSGS
TOOLS_SYSTEM = (
    "<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided "
    "with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}\n</tools>\n\n'
    "For each function call, output the function name and arguments within the following XML format:\n"
    "<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}</arg_value>\n"
    "<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>"
)
CALL = ("\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n<arg_key>days</arg_key>\n"
        "<arg_value>2</arg_value>\n</tool_call><|observation|>\n<tool_response>\nsunny\n</tool_response>\n\n"
        "<tool_response>\nrain\n</tool_response>\n<|assistant|>\n")


@pytest.mark.parametrize("thinking", [True, False])
def test_chat_template_tools_video_thinking_official(tok, thinking):
    nothink = "" if thinking else "/nothink"
    assert tok.apply_chat_template(TOOL_MSGS, tools=TOOLS, tokenize=False, enable_thinking=thinking) == (
        "[gMASK]<sop>" + TOOLS_SYSTEM + "<|system|>\nSYS<|user|>\n<|begin_of_video|><|video|><|end_of_video|>Q1"
        + nothink + "<|assistant|>\n<think></think>\nChecking." + CALL + "<think></think>\nA1<|user|>\nQ2" + nothink
        + "<|assistant|>\n<think>R2</think>\nA2"
    )
    # generating after the tool results: the call's reasoning is after the last user turn, so it stays
    gen = tok.apply_chat_template(TOOL_MSGS[:5], tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert gen.endswith("Q1<|assistant|>\n<think>R0</think>\nChecking." + CALL)
