"""GLM-4.5V conversation -> token ids and labels (template `glm4v_moe`; docs/GLM45V.md sections 1, 6 and 7).

The rendering is the official GLM-V chat template's, token for token what the tokenizer's own
`apply_chat_template` gives followed by the processor's `<|image|>` / `<|video|>` expansion (tested
against the tiny tokenizer's jinja, which renders what the official template renders):

    [gMASK]<sop>[<|system|>\\n# Tools ... </tool_call>]<|system|>\\nSYS<|user|>\\n<|begin_of_image|><|image|><|end_of_image|>Q
    <|assistant|>\\n<think></think>\\nA\\n<tool_call>name\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>\\n</tool_call>
    <|observation|>\\n<tool_response>\\nresult\\n</tool_response>\\n<|assistant|>\\n<think></think>\\nA2<|user|>\\n...

plus one end token after the last assistant turn (`<|user|>`, or `<|observation|>` after a tool call: the
token that ends a turn). Every text piece is tokenised on its own; pieces always meet at a special token,
so the ids equal those of the whole rendered string.

Messages (after data/dataset.py's normalisation): {"role": "system"|"user"|"assistant"|"tool",
"content": str}, assistants optionally with "reasoning_content" (str) and "tool_calls" ([{"name": str,
"arguments": dict}]). Leading system turns, then a user turn; a user turn is answered by the assistant;
an assistant turn with tool calls is followed by one or more tool results, then the assistant again.

Labels (unshifted here, one per token; the collator shifts them):
- each trained assistant turn: its content after `<|assistant|>` (reasoning, answer, tool calls) and the
  end token that follows it (`<|user|>` or `<|observation|>`);
- `train_on_prompt`: the prompts (tools, system, user turns, tool results, `<|assistant|>`) too, except the
  image and video placeholders;
- `mask_history`: only the last assistant turn (and its prompt with train_on_prompt) is trained;
- `enable_thinking: false`: user turns end with `/nothink` (unless they already do). Reasoning
  (`<think>R</think>A` in the content, or `reasoning_content`) is kept only for the assistant turns after
  the last user turn, `\\n<think></think>` elsewhere, as the official template does.

Each `<|image|>` becomes t*h*w/4 image token ids; each `<|video|>` becomes, per temporal patch,
`<|begin_of_image|>` + h*w/4 image token ids + `<|end_of_image|>` + its timestamp text (the processor's
`replace_video_token`). Ids come from the tokenizer, never from constants. A sample that breaks the
format raises `BadSample(reason)`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

IGNORE = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
IMAGE_SPAN = "<|begin_of_image|><|image|><|end_of_image|>"
VIDEO_SPAN = "<|begin_of_video|><|video|><|end_of_video|>"
TEMPLATE_NAMES = ("glm4v_moe", "glm4_5v")
TOOL_FORMATS = ("glm4_moe",)

# The official template's tool instructions (docs/GLM45V.md section 7), between the tool list and the end.
_TOOLS_HEAD = ("<|system|>\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
               "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n")
_TOOLS_TAIL = ("</tools>\n\nFor each function call, output the function name and arguments within the following "
               "XML format:\n<tool_call>{function-name}\n<arg_key>{arg-key-1}</arg_key>\n<arg_value>{arg-value-1}"
               "</arg_value>\n<arg_key>{arg-key-2}</arg_key>\n<arg_value>{arg-value-2}</arg_value>\n...\n</tool_call>")


class BadSample(ValueError):
    """A sample that cannot be trained on; the message is the reason (file:index is added by callers)."""


_SURROGATE = re.compile("[\ud800-\udfff]")
NOT_UTF8 = "text is not valid UTF-8 (a lone surrogate, e.g. a broken emoji)"


def has_lone_surrogate(value: object) -> bool:
    """Whether a str, or any str (key or value) inside lists and dicts, holds a lone UTF-16 surrogate.
    json.loads accepts "\\ud83d" (an emoji cut between its two halves), but such text cannot be UTF-8
    encoded, so the tokenizer, Arrow and json writers all fail on it."""
    if isinstance(value, str):
        return _SURROGATE.search(value) is not None
    if isinstance(value, dict):
        return any(has_lone_surrogate(k) or has_lone_surrogate(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(has_lone_surrogate(v) for v in value)
    return False


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # unshifted: labels[t] is input_ids[t] where trained, else -100


@dataclass
class VideoTokens:
    """What one `<|video|>` expands to: `frame_tokens` image ids per temporal patch, one timestamp each."""

    frame_tokens: int
    timestamps: list[str] = field(default_factory=list)


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant content with an optional `<think>...</think>`, split as the
    official template splits it (newlines next to the tags dropped)."""
    if "</think>" in content:
        head, _, _ = content.partition("</think>")
        return head.rstrip("\n").split("<think>")[-1].lstrip("\n"), content.split("</think>")[-1].lstrip("\n")
    return "", content


def tools_text(tools: list) -> str:
    """The system turn that lists the tools (one JSON per line), as the official template writes it."""
    return _TOOLS_HEAD + "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tools) + _TOOLS_TAIL


def tool_calls_text(calls: list[dict]) -> str:
    """`\\n<tool_call>name` + `\\n<arg_key>k</arg_key>\\n<arg_value>v</arg_value>` per argument (strings raw,
    other values as JSON) + `\\n</tool_call>`, for each call."""
    out = []
    for call in calls:
        out.append("\n<tool_call>" + call["name"])
        for k, v in call["arguments"].items():
            value = v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)
            out.append(f"\n<arg_key>{k}</arg_key>\n<arg_value>{value}</arg_value>")
        out.append("\n</tool_call>")
    return "".join(out)


class GlmTemplate:
    def __init__(self, tokenizer, *, enable_thinking: bool | None = True, train_on_prompt: bool = False,
                 mask_history: bool = False):
        self.tokenizer = tokenizer
        self.no_think = enable_thinking is not None and not enable_thinking
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        ids = {}
        for tok in ("<|user|>", "<|image|>", "<|video|>", "<|begin_of_image|>", "<|end_of_image|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer lacks the GLM special token {tok}; is this a GLM-4.5V tokenizer?")
            ids[tok] = i
        self.user_id, self.image_id, self.pad_id = ids["<|user|>"], ids["<|image|>"], ids["<|endoftext|>"]
        self.video_id, self.image_start_id, self.image_end_id = ids["<|video|>"], ids["<|begin_of_image|>"], ids["<|end_of_image|>"]
        self._stamp_ids: dict[str, list[int]] = {}

    # ---- rendering ------------------------------------------------------------------------------
    def _pieces(self, messages: list[dict], tools: list | None, generation: bool = False) -> list[tuple[str, int, bool]]:
        """[(text, turn, is_answer)]: the rendered conversation cut at special tokens. `turn` numbers the
        assistant turns from 0; a prompt belongs to the turn it leads to, an end token (`<|user|>`,
        `<|observation|>`) to the turn it ends. With `generation` the conversation ends with a user turn
        or tool results and the assistant opening follows."""
        if not messages:
            raise BadSample("no messages")
        roles = [m.get("role") for m in messages]
        start = 0
        while start < len(roles) and roles[start] == "system":
            start += 1
        body = messages[start:]
        _check_order(roles[start:], start, generation)
        last_user = max(i for i, m in enumerate(body) if m["role"] == "user")
        pieces: list[tuple[str, int, bool]] = [("[gMASK]<sop>", 0, False)]
        if tools:
            pieces.append((tools_text(tools), 0, False))
        for m in messages[:start]:
            pieces.append(("<|system|>\n" + self._text(m, "system"), 0, False))
        prompt, turn, prev = "", 0, None
        for i, m in enumerate(body):
            role = m["role"]
            if role == "user":
                if prev == "assistant" and body[i - 1].get("tool_calls"):
                    raise BadSample(f"turn {start + i}: a user turn right after a tool call (its result must follow)")
                text = self._text(m, "user")
                if self.no_think and not text.endswith("/nothink"):
                    text += "/nothink"
                if prev == "assistant":
                    pieces.append(("<|user|>", turn - 1, True))  # ends the previous answer
                    prompt += "\n" + text
                else:
                    prompt += "<|user|>\n" + text
            elif role == "tool":
                if prev == "assistant" and not body[i - 1].get("tool_calls"):
                    raise BadSample(f"turn {start + i}: a tool result after an assistant turn without tool calls")
                if prev == "assistant":
                    pieces.append(("<|observation|>", turn - 1, True))  # ends the tool call
                prompt += "\n<tool_response>\n" + self._text(m, "tool") + "\n</tool_response>\n"
            else:
                pieces.append((prompt + "<|assistant|>", turn, False))
                pieces.append((self._answer(m, keep_reasoning=i > last_user, where=start + i), turn, True))
                prompt, turn = "", turn + 1
            prev = role
        if generation:
            pieces.append((prompt + "<|assistant|>", turn, False))
            pieces.append(("\n<think></think>\n" if self.no_think else "\n", turn, False))
        else:
            pieces.append(("<|observation|>" if body[-1].get("tool_calls") else "<|user|>", turn - 1, True))
        return pieces

    def _answer(self, m: dict, *, keep_reasoning: bool, where: int) -> str:
        content = self._text(m, "assistant")
        if isinstance(m.get("reasoning_content"), str):
            reasoning = m["reasoning_content"]
        else:
            reasoning, content = split_reasoning(content)
        calls = m.get("tool_calls") or []
        for tag in (IMAGE_TAG, VIDEO_TAG):
            if tag in content or tag in reasoning:
                raise BadSample(f"turn {where}: {tag} in an assistant turn")
        if not content.strip() and not reasoning.strip() and not calls:
            raise BadSample(f"turn {where}: empty assistant turn")
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"] \
                    or not isinstance(call.get("arguments"), dict):
                raise BadSample(f"turn {where}: a tool call needs a name and an arguments object, got {call!r}")
        think = reasoning.strip() if keep_reasoning and reasoning else ""
        text = f"\n<think>{think}</think>" + ("\n" + content.strip() if content.strip() else "")
        return text + tool_calls_text(calls)

    @staticmethod
    def _text(message: dict, role: str) -> str:
        content = message.get("content")
        if not isinstance(content, str):
            raise BadSample(f"{role} content is {type(content).__name__}, not a string")
        if role == "tool":
            if IMAGE_TAG in content or VIDEO_TAG in content:
                raise BadSample("an image or video tag in a tool result (not supported)")
            return content
        if role == "assistant":
            return content
        return content.replace(IMAGE_TAG, IMAGE_SPAN).replace(VIDEO_TAG, VIDEO_SPAN)

    # ---- ids --------------------------------------------------------------------------------------
    def expand(self, ids: list[int], image_tokens: list[int], videos: list[VideoTokens]) -> list[int]:
        """`ids` of a rendered text with each `<|image|>` / `<|video|>` expanded, in order (BadSample when
        the counts disagree)."""
        images, vids = iter(image_tokens), iter(videos)
        out = [s for t in ids for s in self._span(t, images, vids)]
        _all_used(images, vids)
        return out

    def _span(self, t: int, images, vids) -> list[int]:
        """What token t becomes: an image's placeholders, a video's frames, or itself."""
        if t == self.image_id:
            n = next(images, None)
            if n is None:
                raise BadSample(f"more {IMAGE_SPAN} spans in the text than images")
            return [t] * n
        if t == self.video_id:
            v = next(vids, None)
            if v is None:
                raise BadSample("more <|video|> placeholders in the text than videos")
            return self.video_ids(v)
        return [t]

    def video_ids(self, v: VideoTokens) -> list[int]:
        """The ids one `<|video|>` becomes (its begin/end-of-video tokens come from the text around it)."""
        missing = [s for s in v.timestamps if s not in self._stamp_ids]
        if missing:
            for s, ids in zip(missing, self.tokenizer(missing, add_special_tokens=False)["input_ids"]):
                self._stamp_ids[s] = ids
        out: list[int] = []
        for s in v.timestamps:
            out += [self.image_start_id] + [self.image_id] * v.frame_tokens + [self.image_end_id] + self._stamp_ids[s]
        return out

    def encode_prompt(self, messages: list[dict], image_tokens: list[int], videos: list[VideoTokens] = (),
                      tools: list | None = None) -> list[int]:
        """Ids of a generation prompt: the conversation so far (ending with a user turn or tool results)
        and the assistant opening `<|assistant|>\\n` (+ `<think></think>\\n` with enable_thinking false), as
        apply_chat_template(add_generation_prompt=True) gives, with images and videos expanded."""
        self._check_tags(messages, image_tokens, videos)
        pieces = self._pieces(messages, tools, generation=True)
        tokenised = self.tokenizer([p[0] for p in pieces], add_special_tokens=False)["input_ids"]
        return self.expand([t for ids in tokenised for t in ids], list(image_tokens), list(videos))

    def encode(self, messages: list[dict], image_tokens: list[int], videos: list[VideoTokens] = (),
               tools: list | None = None) -> Encoded:
        """Token ids and unshifted labels of one conversation; `image_tokens[i]` is the placeholder count
        (t*h*w/4) of its i-th image and `videos[j]` the expansion of its j-th video, in tag order."""
        self._check_tags(messages, image_tokens, videos)
        pieces = self._pieces(messages, tools)
        last_turn = max(p[1] for p in pieces)
        tokenised = self.tokenizer([p[0] for p in pieces], add_special_tokens=False)["input_ids"]
        input_ids: list[int] = []
        labels: list[int] = []
        images, vids = iter(image_tokens), iter(videos)
        for (_, turn, is_answer), ids in zip(pieces, tokenised):
            active = not self.mask_history or turn == last_turn
            trained = active and (is_answer or self.train_on_prompt)
            for t in ids:
                span = self._span(t, images, vids)
                input_ids += span
                labels += [s if trained and s != self.image_id else IGNORE for s in span]
        _all_used(images, vids)
        return Encoded(input_ids, labels)

    @staticmethod
    def _check_tags(messages, image_tokens, videos) -> None:
        texts = [m.get("content") for m in messages if isinstance(m.get("content"), str) and m.get("role") != "tool"]
        for tag, n, what in ((IMAGE_TAG, len(image_tokens), "images"), (VIDEO_TAG, len(videos), "videos")):
            tags = sum(t.count(tag) for t in texts)
            if tags != n:
                raise BadSample(f"{tags} {tag} tags for {n} {what}")


def _all_used(images, vids) -> None:
    if next(images, None) is not None or next(vids, None) is not None:
        raise BadSample("fewer image/video placeholders in the tokenised text than images/videos "
                        "(literal special tokens in the text?)")


def _check_order(roles: list[str], offset: int, generation: bool) -> None:
    """Turn order after the leading system turns (see the module docstring); BadSample naming the turn."""
    if not roles or roles[0] != "user":
        raise BadSample(f"first turn is {roles[0] if roles else 'missing'!r}, not from the user")
    follows = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}
    for k in range(1, len(roles)):
        prev, role = roles[k - 1], roles[k]
        if role not in follows:
            raise BadSample(f"turn {offset + k} has role {role!r} (system turns only come first)")
        if role not in follows[prev]:
            want = " or ".join(repr(r) for r in follows[prev])
            raise BadSample(f"turn {offset + k} is {role!r}, expected {want} after {prev!r}")
    if generation:
        if roles[-1] not in ("user", "tool"):
            raise BadSample("a generation prompt ends with a user turn or tool results")
    elif roles[-1] != "assistant":
        raise BadSample("the last turn is not from the assistant")
