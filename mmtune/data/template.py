"""GLM-4.5V conversation -> token ids and labels (template `glm4v_moe`, docs/GLM45V.md sections 1 and 6).

The rendering is the official format, token for token what the tokenizer's own `apply_chat_template`
gives (tested against the tiny tokenizer's jinja):

    [gMASK]<sop><|system|>\\nSYS<|user|>\\n<|begin_of_image|><|image|><|end_of_image|>Q1<|assistant|>\\n<think></think>\\nA1<|user|>\\nQ2...

plus one `<|user|>` appended after the last assistant turn (the token that ends an answer). Every text
piece is tokenised on its own; pieces always meet at a special token, so the ids equal those of the
whole rendered string.

Labels (unshifted here, one per token; the collator shifts them):
- each trained assistant turn: its content after `<|assistant|>` and the `<|user|>` that follows it;
- `train_on_prompt`: the prompts (system, user turns, `<|assistant|>`) too, except image placeholders;
- `mask_history`: only the last turn (its answer, and its prompt with train_on_prompt) is trained;
- `enable_thinking: false`: user turns end with `/nothink`; an answer without reasoning renders as
  `\\n<think></think>\\n` + answer either way. Reasoning (`<think>R</think>A` in the content) is kept only
  in the last answer, as the official template does.

Each `<|image|>` is expanded to t*h*w/4 copies of the image token id. Ids come from the tokenizer, never
from constants. A sample that breaks the format raises `BadSample(reason)`.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE = -100
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"
IMAGE_SPAN = "<|begin_of_image|><|image|><|end_of_image|>"
TEMPLATE_NAMES = ("glm4v_moe", "glm4_5v")


class BadSample(ValueError):
    """A sample that cannot be trained on; the message is the reason (file:index is added by callers)."""


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # unshifted: labels[t] is input_ids[t] where trained, else -100


def split_reasoning(content: str) -> tuple[str, str]:
    """(reasoning, answer) of an assistant content with an optional `<think>...</think>`."""
    if "</think>" in content:
        head, _, tail = content.rpartition("</think>")
        return head.split("</think>")[0].split("<think>")[-1], tail
    return "", content


class GlmTemplate:
    def __init__(self, tokenizer, *, enable_thinking: bool | None = True, train_on_prompt: bool = False,
                 mask_history: bool = False):
        self.tokenizer = tokenizer
        self.no_think = enable_thinking is not None and not enable_thinking
        self.train_on_prompt = train_on_prompt
        self.mask_history = mask_history
        ids = {}
        for tok in ("<|user|>", "<|image|>", "<|endoftext|>"):
            i = tokenizer.convert_tokens_to_ids(tok)
            if i is None or i == tokenizer.unk_token_id:
                raise ValueError(f"tokenizer lacks the GLM special token {tok}; is this a GLM-4.5V tokenizer?")
            ids[tok] = i
        self.user_id, self.image_id, self.pad_id = ids["<|user|>"], ids["<|image|>"], ids["<|endoftext|>"]

    def _pieces(self, messages: list[dict]) -> list[tuple[str, int, bool]]:
        """[(text, turn, is_answer)]: the rendered conversation cut at special tokens. `turn` numbers the
        user/assistant rounds from 0 (prefix and system belong to round 0); the `<|user|>` after an answer
        is its own piece counted as that answer's."""
        if not messages:
            raise BadSample("no messages")
        roles = [m.get("role") for m in messages]
        start = 0
        while start < len(roles) and roles[start] == "system":
            start += 1
        body = roles[start:]
        if not body or body[0] != "user":
            raise BadSample(f"first turn is {body[0] if body else 'missing'!r}, not from the user")
        for k, role in enumerate(body):
            want = "user" if k % 2 == 0 else "assistant"
            if role != want:
                raise BadSample(f"turn {start + k} is {role!r}, expected {want!r} (user and assistant alternate)")
        if body[-1] != "assistant":
            raise BadSample("the last turn is not from the assistant")
        pieces: list[tuple[str, int, bool]] = [("[gMASK]<sop>", 0, False)]
        for m in messages[:start]:
            pieces.append(("<|system|>\n" + self._text(m, "system"), 0, False))
        n_rounds = len(body) // 2
        for r in range(n_rounds):
            user, answer = messages[start + 2 * r], messages[start + 2 * r + 1]
            if r > 0:
                pieces.append(("<|user|>", r - 1, True))  # ends the previous answer
                pieces.append(("\n" + self._text(user, "user") + ("/nothink" if self.no_think else "") + "<|assistant|>", r, False))
            else:
                pieces.append(("<|user|>\n" + self._text(user, "user") + ("/nothink" if self.no_think else "") + "<|assistant|>", r, False))
            reasoning, text = split_reasoning(self._text(answer, "assistant"))
            if IMAGE_TAG in text or IMAGE_TAG in reasoning:
                raise BadSample(f"turn {start + 2 * r + 1}: {IMAGE_TAG} in an assistant turn")
            if not text.strip() and not reasoning.strip():
                raise BadSample(f"turn {start + 2 * r + 1}: empty assistant turn")
            last = r == n_rounds - 1
            think = reasoning.strip() if last else ""
            pieces.append((f"\n<think>{think}</think>\n{text.strip()}", r, True))
        pieces.append(("<|user|>", n_rounds - 1, True))
        return pieces

    @staticmethod
    def _text(message: dict, role: str) -> str:
        content = message.get("content")
        if not isinstance(content, str):
            raise BadSample(f"{role} content is {type(content).__name__}, not a string")
        if VIDEO_TAG in content:
            raise BadSample(f"{VIDEO_TAG}: videos are not supported yet")
        return content.replace(IMAGE_TAG, IMAGE_SPAN) if role != "assistant" else content

    def encode_prompt(self, messages: list[dict], image_tokens: list[int]) -> list[int]:
        """Ids of a generation prompt: the conversation so far (ending with a user turn) and the
        assistant opening `<|assistant|>\\n` (+ `<think></think>\\n` with enable_thinking false), as
        apply_chat_template(add_generation_prompt=True) gives, with `<|image|>` expanded."""
        if not messages or messages[-1].get("role") != "user":
            raise BadSample("a generation prompt ends with a user turn")
        filler = [*messages, {"role": "assistant", "content": "x"}]
        enc = self.encode(filler, image_tokens)
        pieces = self._pieces(filler)
        tail = self.tokenizer([p[0] for p in pieces[-2:]], add_special_tokens=False)["input_ids"]
        ids = enc.input_ids[: len(enc.input_ids) - len(tail[0]) - len(tail[1])]
        opening = "\n<think></think>\n" if self.no_think else "\n"
        return ids + self.tokenizer(opening, add_special_tokens=False)["input_ids"]

    def encode(self, messages: list[dict], image_tokens: list[int]) -> Encoded:
        """Token ids and unshifted labels of one conversation; `image_tokens[i]` is the placeholder count
        (t*h*w/4) of its i-th image, in the order of the `<image>` tags."""
        tags = sum(m.get("content", "").count(IMAGE_TAG) for m in messages if isinstance(m.get("content"), str))
        if tags != len(image_tokens):
            raise BadSample(f"{tags} {IMAGE_TAG} tags for {len(image_tokens)} images")
        pieces = self._pieces(messages)
        n_rounds = pieces[-1][1] + 1
        tokenised = self.tokenizer([p[0] for p in pieces], add_special_tokens=False)["input_ids"]
        input_ids: list[int] = []
        labels: list[int] = []
        images = iter(image_tokens)
        for (_, turn, is_answer), ids in zip(pieces, tokenised):
            active = not self.mask_history or turn == n_rounds - 1
            trained = active and (is_answer or self.train_on_prompt)
            for t in ids:
                if t == self.image_id:
                    n = next(images, None)
                    if n is None:
                        raise BadSample(f"more {IMAGE_SPAN} spans in the text than images")
                    input_ids += [t] * n
                    labels += [IGNORE] * n
                else:
                    input_ids.append(t)
                    labels.append(t if trained else IGNORE)
        if next(images, None) is not None:
            raise BadSample("fewer image spans in the tokenised text than images (literal special tokens in the text?)")
        return Encoded(input_ids, labels)
