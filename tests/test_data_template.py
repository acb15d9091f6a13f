"""template.py: token-for-token equal to the tokenizer's apply_chat_template; labels per docs/GLM45V.md section 6."""

from __future__ import annotations

import pytest

from hf_video import video_structure

from mmtune.data.template import IGNORE, BadSample, GlmTemplate, VideoTokens
from mmtune.data.tokenizer_tiny import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(d)
    return AutoTokenizer.from_pretrained(d)


def _parts(content):
    out = []
    for seg in content.replace("<video>", "\0v\0").replace("<image>", "\0i\0").split("\0"):
        if seg in ("i", "v"):
            out.append({"type": "image" if seg == "i" else "video"})
        elif seg:
            out.append({"type": "text", "text": seg})
    return out


def _video_meta(v: VideoTokens):
    """transformers VideoMetadata whose timestamps give v's texts (GLM-4.5V: str(int(seconds)))."""
    from transformers.video_utils import VideoMetadata

    idx = [i for s in v.timestamps for i in (int(s) * 2, int(s) * 2 + 1)]
    return VideoMetadata(total_num_frames=max(idx) + 1, fps=2.0, frames_indices=idx)


def _reference(tok, messages, image_tokens, videos=(), tools=None, **kw):
    """apply_chat_template on list-content messages, then the processor's expansion (its own
    replace_video_token for videos), tokenised; + the trailing end token."""
    hf = [{**m, "content": _parts(m["content"])} if m["role"] == "user" else m for m in messages]
    text = tok.apply_chat_template(hf, tokenize=False, tools=tools, **kw)
    image_counts, vids = iter(image_tokens), iter(videos)
    pieces = text.replace("<|video|>", "\0v\0").replace("<|image|>", "\0i\0").split("\0")
    out = ""
    for piece in pieces:
        if piece == "i":
            out += "<|image|>" * next(image_counts)
        elif piece == "v":
            v = next(vids)
            out += video_structure("glm4v", (len(v.timestamps), 2, 2 * v.frame_tokens), _video_meta(v))
        else:
            out += piece
    assert next(image_counts, None) is None and next(vids, None) is None
    end = "<|observation|>" if messages[-1].get("tool_calls") else "<|user|>"
    return tok(out, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(end)]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"name": "count", "description": "Zählen"}]
VIDEO_A = VideoTokens(4, ["0", "1", "2"])
VIDEO_B = VideoTokens(9, ["0", "7"])

CASES = {
    "multi_turn_system_images": ([
        {"role": "system", "content": "You are helpful. Ünïcode ✓"},
        {"role": "user", "content": "<image>\nWhat color is the shape?"},
        {"role": "assistant", "content": "<think>It looks warm.</think>red"},
        {"role": "user", "content": "And this one <image> here?"},
        {"role": "assistant", "content": "<think>\nRound.\n</think>\n\n circle "},
    ], [4, 9], [], None),
    "text_only": ([{"role": "user", "content": "Name the color in: a red circle."}, {"role": "assistant", "content": "red"}], [], [], None),
    "three_turns": ([
        {"role": "user", "content": "<image>hi"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "b?"}, {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d?"}, {"role": "assistant", "content": "e f"},
    ], [1], [], None),
    "video": ([{"role": "user", "content": "<video>\nWhich way does the shape move?"},
               {"role": "assistant", "content": "left"}], [], [VIDEO_A], None),
    "image_and_videos": ([
        {"role": "user", "content": "<image> then <video> and <video>?"}, {"role": "assistant", "content": "a"},
        {"role": "user", "content": "more <image>"}, {"role": "assistant", "content": "<think>hm</think>b"},
    ], [4, 1], [VIDEO_A, VIDEO_B], None),
    "tools_two_results": ([
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "<image>Weather in Paris and Rome?"},
        {"role": "assistant", "content": "<think>two calls</think>Checking.", "tool_calls": [
            {"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "alerts": True}},
            {"name": "get_weather", "arguments": {"city": "Rome", "when": None, "ids": [1, "x"]}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": '{"sky": "rain"}'},
        {"role": "assistant", "content": "Paris sunny, Rome rain.", "reasoning_content": "both back"},
        {"role": "user", "content": "Count them"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "count", "arguments": {"n": 2}}]},
        {"role": "tool", "content": "2"},
        {"role": "assistant", "content": "<think>easy</think>Two."},
    ], [4], [], TOOLS),
    "ends_with_tool_call": ([
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]},
    ], [], [], TOOLS),
}


def _hf_messages(messages):
    """The OpenAI-style form the official template reads (tool calls under "function")."""
    return [{**m, "tool_calls": [{"type": "function", "function": c} for c in m["tool_calls"]]} if m.get("tool_calls") else m
            for m in messages]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("thinking", [True, False])
def test_equals_apply_chat_template(tok, name, thinking):
    messages, images, videos, tools = CASES[name]
    enc = GlmTemplate(tok, enable_thinking=thinking).encode(messages, images, videos, tools)
    assert enc.input_ids == _reference(tok, _hf_messages(messages), images, videos, tools, enable_thinking=thinking)
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
    messages, images, _, _ = CASES["three_turns"]
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


def test_tool_call_labels(tok):
    """Calls and answers are trained, each with the token that ends it; tool results are prompts;
    reasoning survives only after the last user turn; mask_history keeps only the last answer."""
    messages, images, videos, tools = CASES["tools_two_results"]
    spans = _trained_text(tok, GlmTemplate(tok).encode(messages, images, videos, tools))
    call = "\n<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>{}</arg_value>"
    assert spans == [
        "\n<think></think>\nChecking." + call.format("Paris") + "\n<arg_key>days</arg_key>\n<arg_value>2</arg_value>"
        "\n<arg_key>alerts</arg_key>\n<arg_value>true</arg_value>\n</tool_call>" + call.format("Rome")
        + '\n<arg_key>when</arg_key>\n<arg_value>null</arg_value>\n<arg_key>ids</arg_key>\n<arg_value>[1, "x"]'
        "</arg_value>\n</tool_call><|observation|>",
        "\n<think></think>\nParis sunny, Rome rain.<|user|>",
        "\n<think></think>\n<tool_call>count\n<arg_key>n</arg_key>\n<arg_value>2</arg_value>\n</tool_call><|observation|>",
        "\n<think>easy</think>\nTwo.<|user|>",
    ]
    spans = _trained_text(tok, GlmTemplate(tok, mask_history=True).encode(messages, images, videos, tools))
    assert spans == ["\n<think>easy</think>\nTwo.<|user|>"]
    messages, images, videos, tools = CASES["ends_with_tool_call"]
    assert _trained_text(tok, GlmTemplate(tok).encode(messages, images, videos, tools))[-1].endswith("</tool_call><|observation|>")


def test_video_placeholders_never_trained(tok):
    messages, images, videos, tools = CASES["video"]
    enc = GlmTemplate(tok, train_on_prompt=True).encode(messages, images, videos, tools)
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert sum(t == image_id for t in enc.input_ids) == 12
    assert all((lab == IGNORE) == (t == image_id) for t, lab in zip(enc.input_ids, enc.labels))
    assert "<|end_of_image|>2<|end_of_video|>" in tok.decode(enc.input_ids)


@pytest.mark.parametrize("messages,videos,reason", [
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"},
      {"role": "assistant", "content": "b"}], [], "without tool calls"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
      {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}], [], "right after a tool call"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": "{}"}]}],
     [], "arguments object"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
      {"role": "tool", "content": "<image>"}, {"role": "assistant", "content": "b"}], [], "tool result"),
    ([{"role": "user", "content": "<video>q"}, {"role": "assistant", "content": "a"}], [], "1 <video> tags for 0 videos"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a <video>"}], [VIDEO_A], "1 <video> tags for 1|in an assistant"),
    ([{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}], [],
     "system turns only come first"),
])
def test_bad_tool_and_video_conversations(tok, messages, videos, reason):
    with pytest.raises(BadSample, match=reason):
        GlmTemplate(tok).encode(messages, [], videos)


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
    for name, cut in (("multi_turn_system_images", -1), ("tools_two_results", 4), ("video", -1)):
        messages, images, videos, tools = CASES[name]
        prompt = messages[:cut]
        n_img = sum(m["content"].count("<image>") for m in prompt)
        ref = _reference(tok, _hf_messages(prompt), images[:n_img], videos, tools, add_generation_prompt=True,
                         enable_thinking=thinking)[:-1]
        got = GlmTemplate(tok, enable_thinking=thinking).encode_prompt(prompt, images[:n_img], videos, tools)
        assert got == ref, name
