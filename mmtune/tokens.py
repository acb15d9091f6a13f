"""GLM-4.5V special tokens (docs/GLM45V.md section 1).

The real tokenizer places them in one contiguous block starting at id 151329. The tiny tokenizer of
`mmtune make-tiny` keeps the same order but starts the block at `TINY_SPECIAL_BASE`, so its vocabulary
(and the embedding matrix) stays small. Code never hard-codes an id: it reads them from the
tokenizer or the model config.
"""

from __future__ import annotations

# In id order, starting at the block base (151329 in the real tokenizer).
SPECIAL_TOKENS: list[str] = [
    "<|endoftext|>",  # 151329  eos and pad
    "[MASK]",  # 151330
    "[gMASK]",  # 151331
    "[sMASK]",  # 151332
    "<sop>",  # 151333
    "<eop>",  # 151334
    "<|system|>",  # 151335
    "<|user|>",  # 151336
    "<|assistant|>",  # 151337
    "<|observation|>",  # 151338
    "<|begin_of_image|>",  # 151339
    "<|end_of_image|>",  # 151340
    "<|begin_of_video|>",  # 151341
    "<|end_of_video|>",  # 151342
    "<|begin_of_audio|>",  # 151343
    "<|end_of_audio|>",  # 151344
    "<|begin_of_transcription|>",  # 151345
    "<|end_of_transcription|>",  # 151346
    "<|code_prefix|>",  # 151347
    "<|code_middle|>",  # 151348
    "<|code_suffix|>",  # 151349
    "<think>",  # 151350
    "</think>",  # 151351
    "<tool_call>",  # 151352
    "</tool_call>",  # 151353
    "<tool_response>",  # 151354
    "</tool_response>",  # 151355
    "<arg_key>",  # 151356
    "</arg_key>",  # 151357
    "<arg_value>",  # 151358
    "</arg_value>",  # 151359
    "/nothink",  # 151360
    "<|begin_of_box|>",  # 151361
    "<|end_of_box|>",  # 151362
    "<|image|>",  # 151363
    "<|video|>",  # 151364
]

REAL_SPECIAL_BASE = 151329
TINY_VOCAB_SIZE = 512
TINY_SPECIAL_BASE = TINY_VOCAB_SIZE - 40  # 472 .. 507; 508-511 are unused padding rows


def special_token_ids(base: int = REAL_SPECIAL_BASE) -> dict[str, int]:
    """token -> id for a special block starting at `base`."""
    return {tok: base + i for i, tok in enumerate(SPECIAL_TOKENS)}


def model_token_ids(base: int = REAL_SPECIAL_BASE) -> dict[str, object]:
    """The token-id fields of a GLM-4.5V config.json for a special block starting at `base`."""
    ids = special_token_ids(base)
    return {
        "image_token_id": ids["<|image|>"],
        "video_token_id": ids["<|video|>"],
        "image_start_token_id": ids["<|begin_of_image|>"],
        "image_end_token_id": ids["<|end_of_image|>"],
        "video_start_token_id": ids["<|begin_of_video|>"],
        "video_end_token_id": ids["<|end_of_video|>"],
        "eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
        "pad_token_id": ids["<|endoftext|>"],
    }
