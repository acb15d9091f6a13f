"""Which GLM-V processor a model dir asks for: GLM-4.1V / GLM-4.5V's (`glm4v`) or GLM-4.6V's (`glm46v`).

The choice belongs to the model dir's processor files, not to the architecture: GLM-4.6V (MoE, model_type
glm4v_moe) and GLM-4.6V-Flash (dense, glm4v) both ship the GLM-4.6V processor, GLM-4.5V and GLM-4.1V the
older one. transformers 5.24 implements the two as `Glm4vProcessor` and `Glm46VProcessor`; their image
processors compute the same pixels (mmtune.data.images serves both), their video processors differ in
frame sampling and timestamp text (docs/GLM45V.md section 7), which the video pipeline reads from here.

A dir is `glm46v` when any of these names a GLM-4.6V class (`Glm46V...`): preprocessor_config.json's
`processor_class` / `image_processor_type`, video_preprocessor_config.json's `processor_class` /
`video_processor_type`, processor_config.json's `processor_class`. Otherwise it is `glm4v`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

GLM4V, GLM46V = "glm4v", "glm46v"
_FILES_AND_KEYS = (
    ("preprocessor_config.json", ("processor_class", "image_processor_type")),
    ("video_preprocessor_config.json", ("processor_class", "video_processor_type")),
    ("processor_config.json", ("processor_class",)),
)


def processor_family(model_dir: str | os.PathLike) -> str:
    """`"glm46v"` or `"glm4v"` for an HF model dir (see the module docstring); ValueError naming the file
    when one of them is not valid JSON."""
    for name, keys in _FILES_AND_KEYS:
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        try:
            cfg = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from e
        if any(str(cfg.get(key) or "").startswith("Glm46V") for key in keys):
            return GLM46V
    return GLM4V
