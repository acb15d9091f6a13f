"""The recipe's config files and their documentation.

`tests/recipe/` holds MindSpeed-MM's data_106B.json, model_106B.json and fsdp2_config.yaml verbatim;
`examples/glm4.5v/` holds mmtune's versions of them; docs/RECIPE.md has one table row for every key
mmtune accepts in those files and for every flag of `mmtune train`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import yaml
from pydantic import BaseModel

from mmtune.data.config import DataConfig
from mmtune.train.args import Fsdp2Config, ModelJsonConfig, build_parser

ROOT = Path(__file__).resolve().parents[1]
VERBATIM = ROOT / "tests" / "recipe"
EXAMPLES = ROOT / "examples" / "glm4.5v"
NAMES = ("data_106B.json", "model_106B.json", "fsdp2_config.yaml")

# How examples/glm4.5v/model_106B.json departs from the recipe's (docs/RECIPE.md, last section).
MODEL_JSON_DROPPED = ("patch",)
MODEL_JSON_CHANGED = {("text_decoder", "hidden_size"): 4096, ("loss_cfg", "compute_mode"): "chunk"}


def _leaves(d: dict, prefix: tuple = ()) -> dict[tuple, object]:
    out = {}
    for k, v in d.items():
        out.update(_leaves(v, prefix + (k,)) if isinstance(v, dict) and v else {prefix + (k,): v})
    return out


# SHA-256 of MindSpeed-MM's original files (its GLM-4.5V example, as distributed with the recipe; docs/RECIPE.md),
# taken from the originals when tests/recipe/ was made: the copies must stay byte for byte those files.
ORIGINAL_SHA256 = {
    "data_106B.json": "aa2a36340e43314b53e9e3cd014906c3d73337bcbaee943e1b9e88fbc2eccaf9",
    "model_106B.json": "eec9c2a4d3ff888e59410a2dcc0d8c040c807114f124e1e6230620f46c3cf51d",
    "fsdp2_config.yaml": "7b46428ea2b286ef63a103661c016df844576d10064a726131d2f740415703ac",
}


def test_verbatim_copies_are_the_recipes_files():
    for name in NAMES:
        digest = hashlib.sha256((VERBATIM / name).read_bytes()).hexdigest()
        assert digest == ORIGINAL_SHA256[name], f"tests/recipe/{name} is not the recipe's"
    seed = os.environ.get("MMTUNE_RECIPE_SEED")  # optionally, a dir holding the originals themselves
    if seed:
        for name in NAMES:
            assert (VERBATIM / name).read_bytes() == (Path(seed) / name).read_bytes(), f"{seed}/{name} differs"


def test_examples_follow_the_recipe_key_for_key():
    read_json = lambda p: json.loads(p.read_text())  # noqa: E731
    assert read_json(EXAMPLES / "data_106B.json") == read_json(VERBATIM / "data_106B.json")
    ours_yaml, theirs_yaml = (yaml.safe_load((d / "fsdp2_config.yaml").read_text()) for d in (EXAMPLES, VERBATIM))
    assert ours_yaml == theirs_yaml
    ours = _leaves(read_json(EXAMPLES / "model_106B.json"))
    theirs = {k: v for k, v in _leaves(read_json(VERBATIM / "model_106B.json")).items()
              if k[0] not in MODEL_JSON_DROPPED}
    assert set(ours) == set(theirs)
    assert {k: ours[k] for k in ours if ours[k] != theirs[k]} == MODEL_JSON_CHANGED


def _model_keys(model: type[BaseModel], prefix: tuple = ()) -> set[tuple]:
    keys = set()
    for name, field in model.model_fields.items():
        sub = field.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            keys |= _model_keys(sub, prefix + (name,))
        else:
            keys.add(prefix + (name,))
    return keys


def _documented(section_title: str) -> set[str]:
    """The code spans of the first cell of every table row in the docs/RECIPE.md section(s) whose
    heading starts with section_title."""
    text = (ROOT / "docs" / "RECIPE.md").read_text()
    spans = set()
    for part in re.split(r"^## ", text, flags=re.M)[1:]:
        if part.startswith(section_title):
            for line in part.splitlines():
                cells = line.split("|")
                if line.startswith("|") and len(cells) > 2 and not set(cells[1].strip()) <= set("-"):
                    spans |= set(re.findall(r"`([^`]+)`", cells[1]))
    return spans


def test_recipe_md_has_one_row_for_every_key_and_flag():
    data = {".".join(k[1:] if k[0] == "dataset_param" and len(k) > 2 else k)
            for k in _model_keys(DataConfig) if k != ("source",)}
    assert _documented("data.json") == data
    patch = {k for k in _leaves(json.loads((VERBATIM / "model_106B.json").read_text())) if k[0] == "patch"}
    model = {".".join(k) for k in (_model_keys(ModelJsonConfig) - {("patch",)}) | patch}
    assert _documented("model.json") == model
    assert _documented("fsdp2_config.yaml") == {k[0] for k in _model_keys(Fsdp2Config)}
    flags = {s for a in build_parser()._actions for s in a.option_strings if s.startswith("--")} - {"--help"}
    assert _documented("Launch flags") == flags
