"""Reading the recipe's config files (data.json, model.json, fsdp2 yaml, train yaml) strictly.

Every file is validated by a pydantic model that forbids unknown keys; a bad file raises ValueError
naming the file, the key (dotted path) and, for a misspelt key, the closest known one.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

M = TypeVar("M", bound=BaseModel)

# The dtype spellings config files and flags accept -> the torch.dtype attribute (one table for the fsdp2
# yaml, mmtune.distributed.parallelize.parse_dtype and `mmtune plan`; kept here so parsing needs no torch).
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "fp32": "float32", "float32": "float32"}


class StrictModel(BaseModel):
    """A config section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


def read_mapping(path: str | os.PathLike, kind: str) -> dict:
    """The top-level mapping of a json (`kind="json"`) or yaml file; errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if kind == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ValueError(f"{p}: not valid {kind}: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def validate(cls: type[M], data: dict, source: str | os.PathLike | None) -> M:
    """`cls.model_validate(data)`, with every problem described by its key path (and a close match)."""
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        where = f"{source}: " if source else ""
        raise ValueError(where + "; ".join(_describe(cls, e) for e in exc.errors())) from None


def suggest(word: str, choices: list[str]) -> str:
    """' (did you mean 'x'?)' for the closest choice, or ''."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe(cls: type[BaseModel], err: dict[str, Any]) -> str:
    loc = ".".join(str(x) for x in err["loc"])
    if err["type"] != "extra_forbidden":
        return f"key {loc!r}: {err['msg']}"
    owner = cls
    for part in err["loc"][:-1]:
        ann = owner.model_fields[part].annotation if isinstance(part, str) and part in owner.model_fields else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            break
        owner = ann
    return f"unknown key {loc!r}" + suggest(str(err["loc"][-1]), list(owner.model_fields))
