"""The tiny GLM tokenizer of `mmtune make-tiny`: byte-level BPE, 512 ids.

Ids 0..471 are a byte-level BPE (the 256 byte symbols + merges) trained deterministically on the small
English corpus below, which covers the words of the shapes task (mmtune.data.shapes). Any UTF-8 text
encodes. Ids 472..507 are the GLM special tokens of mmtune.tokens, in the real tokenizer's order, so the
tiny and the real tokenizer differ only in where the block starts. 508..511 are unused rows of the
embedding (config.tiny_config() has vocab 512).

The chat template (chat_template.jinja next to this file) renders the official GLM-4.5V format
(docs/GLM45V.md sections 1 and 6); it is saved as chat_template.jinja and inside tokenizer_config.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from mmtune.tokens import SPECIAL_TOKENS, TINY_SPECIAL_BASE

CHAT_TEMPLATE_PATH = Path(__file__).with_name("chat_template.jinja")

# Words of the shapes task first (colours, shapes, sizes, positions, question forms), then plain English.
_CORPUS = """
What color is the shape? What shape is this? What shape is in the image? What color is it?
Is the shape big or small? Where is the shape? Describe the shape. Describe the image.
red green blue yellow purple orange white black gray pink brown cyan
circle square triangle cross star diamond ring line
red circle. green square. blue triangle. yellow cross. purple circle. orange square.
a red circle, a green square, a blue triangle, a yellow cross, a purple star, an orange ring.
big small large tiny left right top bottom center middle corner above below
The shape is red. The shape is a circle. The shape is on the left. The shape is small.
It is a big blue square in the top left corner. It is a small yellow triangle at the bottom.
Name the color in: a red circle. Name the shape in: a green square.
How many sides does a triangle have? three. How many sides does a square have? four.
Which shape has no corners? circle. Which shape has four equal sides? square.
one two three four five six seven eight nine ten zero yes no
Question: answer: the a an of to in is it that and or for with on as by at from this these those
The quick brown fox jumps over the lazy dog. A picture shows a simple colored shape on a plain
background. The model looks at the image and answers the question with one or two words.
I can see a shape in the picture. There is one object. The object has a color and a form.
Please answer the question about the picture. Thank you for the answer, that is correct.
Training a small vision language model on a computer takes a few minutes. The loss goes down.
Hello, how are you today? I am fine, thank you. What is your name? My name is assistant.
People write text in many languages, and every letter is encoded as bytes.
"""


def build_tiny_tokenizer() -> Tokenizer:
    """The tiny tokenizer as a `tokenizers.Tokenizer` (BPE ids 0..471, GLM specials from 472)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPECIAL_BASE,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    lines = [line for line in _CORPUS.strip().splitlines() if line.strip()]
    tok.train_from_iterator(lines * 4, trainer=trainer)
    assert tok.get_vocab_size() == TINY_SPECIAL_BASE, f"BPE vocab {tok.get_vocab_size()} != {TINY_SPECIAL_BASE}"
    added = tok.add_special_tokens(SPECIAL_TOKENS)
    assert added == len(SPECIAL_TOKENS)
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(token) == TINY_SPECIAL_BASE + i, token
    return tok


def chat_template() -> str:
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


def tokenizer_config() -> dict:
    """tokenizer_config.json: transformers' fast tokenizer over tokenizer.json, eos/pad <|endoftext|>."""
    added = {
        str(TINY_SPECIAL_BASE + i): {
            "content": token, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True,
        }
        for i, token in enumerate(SPECIAL_TOKENS)
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"],
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "model_max_length": 128000,
        "padding_side": "right",
        "remove_space": False,
        "chat_template": chat_template(),
    }


def save_tiny_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and chat_template.jinja
    into `out_dir` (created if missing). `AutoTokenizer.from_pretrained(out_dir)` loads it offline."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "tokenizer.json": build_tiny_tokenizer().to_str(pretty=True),
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, ensure_ascii=False) + "\n",
        "chat_template.jinja": chat_template(),
    }
    for name, text in files.items():
        tmp = out / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out / name)
