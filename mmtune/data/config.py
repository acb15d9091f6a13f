"""data.json: the MindSpeed-MM data config (`dataset_param` / `dataloader_param`), validated.

The recipe's data_106B.json is accepted as it is (paths aside). Unknown keys raise ValueError naming them.
Relative paths resolve against the current directory (as in the recipe's launch scripts); each entry
of the comma-separated `dataset` list is looked up under `dataset_dir` first, then as given. Image paths
inside the data files are relative to `dataset_dir`.

mmtune extras (all optional, in `basic_parameters`):
- `packing` (bool, default false, as the recipe): false = one sample a row, each micro-batch padded to its
  longest sample (so --global-batch-size counts samples); true = samples packed into rows of <= seq_length
  tokens (the batch sizes then count rows).
- `on_bad_sample` ("skip" | "error", default "skip"): a sample that cannot be trained on (see
  `mmtune data check`) is skipped and counted, or stops the run with file:index: reason.
- `too_long` ("truncate" | "drop", default "drop"): a sample longer than seq_length is cut (never
  inside an image) or dropped; counted either way.
- `allow_absolute_image_paths` (bool, default false): accept absolute or `..` image paths that leave
  dataset_dir.
- `streaming` (bool, default false): read the files lazily (no preprocessing pass, no cache); resumable.
- `dataloader_param.num_workers` (int, default 2): loader worker processes (image decoding happens there);
  `mmtune train --num-workers` overrides it.

Videos (docs/GLM45V.md section 7): the `attr.videos` column (default "videos") lists video files, placed
at the `<video>` tags; `video_fps` (default: the processor's, 2), `video_maxlen` (frames per video),
`video_max_pixels` / `video_min_pixels` (per frame, H*W, as the image bounds) shape the sampling
(data/video.py). Tools: `tool_format: glm4_moe` renders tools (`attr.tools` column, default "tools"),
tool calls (`attr.function_tag` messages, default "function_call", or OpenAI `tool_calls`) and tool
results (`attr.observation_tag`, default "observation", or role "tool") as the official template does;
with null a sample that uses them is a bad sample.

Every other key is the recipe's; docs/RECIPE.md says what mmtune does with each. Keys accepted for
compatibility that have no effect (e.g. a sampler_type other than the recipe's, use_fast_tokenizer: false)
are named when training starts (mmtune/train/compat.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import field_validator

from mmtune.config_files import StrictModel, read_mapping, validate


_Strict = StrictModel


class PreprocessParameters(_Strict):
    model_name_or_path: str | None = None
    use_fast_tokenizer: bool = True
    split_special_tokens: bool = False
    image_max_pixels: int | None = 768 * 768
    image_min_pixels: int | None = 32 * 32
    video_max_pixels: int | None = None
    video_min_pixels: int | None = None
    video_fps: float | None = None
    video_maxlen: int | None = None

    @field_validator("split_special_tokens")
    @classmethod
    def _no_split(cls, v):
        if v:
            raise ValueError("split_special_tokens: true is not supported (the GLM format needs its special tokens)")
        return v


class BasicParameters(_Strict):
    template: str = "glm4v_moe"
    dataset_dir: str = "."
    dataset: str
    cache_dir: str | None = None
    enable_thinking: bool | None = True
    overwrite_cache: bool = False
    train_on_prompt: bool = False
    mask_history: bool = False
    preprocessing_batch_size: int = 1000
    preprocessing_num_workers: int | None = None
    max_samples: int | None = None
    tool_format: str | None = None
    streaming: bool = False
    # mmtune extras
    packing: bool = False
    on_bad_sample: Literal["skip", "error"] = "skip"
    too_long: Literal["truncate", "drop"] = "drop"
    allow_absolute_image_paths: bool = False

    @field_validator("template")
    @classmethod
    def _template(cls, v):
        from mmtune.data.template import TEMPLATE_NAMES

        if v not in TEMPLATE_NAMES:
            raise ValueError(f"template {v!r} is not supported; use one of {TEMPLATE_NAMES}")
        return v

    @field_validator("tool_format")
    @classmethod
    def _tools(cls, v):
        from mmtune.data.template import TOOL_FORMATS

        if v is not None and v not in TOOL_FORMATS:
            raise ValueError(f"tool_format {v!r} is not supported; use one of {TOOL_FORMATS} (GLM-4.5V's) or null")
        return v

    @field_validator("max_samples")
    @classmethod
    def _max(cls, v):
        if v is not None and v < 1:
            raise ValueError("max_samples must be >= 1 or null")
        return v


class Attr(_Strict):
    system: str | None = None
    images: str | None = "images"
    videos: str | None = "videos"
    tools: str | None = "tools"
    messages: str = "messages"
    role_tag: str = "role"
    content_tag: str = "content"
    user_tag: str = "user"
    assistant_tag: str = "assistant"
    observation_tag: str | None = None
    function_tag: str | None = None
    system_tag: str | None = None


class DatasetParam(_Strict):
    dataset_type: Literal["huggingface"] = "huggingface"
    preprocess_parameters: PreprocessParameters = PreprocessParameters()
    basic_parameters: BasicParameters
    attr: Attr = Attr()


class CollateParam(_Strict):
    model_name: str | None = None
    ignore_pad_token_for_loss: bool = True


class DataloaderParam(_Strict):
    dataloader_mode: str = "sampler"
    drop_last: bool = True
    sampler_type: str | None = None
    collate_param: CollateParam = CollateParam()
    pin_memory: bool = False
    shuffle: bool = True
    num_workers: int = 2


class DataConfig(_Strict):
    dataset_param: DatasetParam
    dataloader_param: DataloaderParam = DataloaderParam()
    source: str | None = None  # the file it was read from (set by load_data_config)

    @property
    def basic(self) -> BasicParameters:
        return self.dataset_param.basic_parameters

    @property
    def attr(self) -> Attr:
        return self.dataset_param.attr

    @property
    def preprocess(self) -> PreprocessParameters:
        return self.dataset_param.preprocess_parameters

    def dataset_dir(self) -> Path:
        return Path(self.basic.dataset_dir).resolve()

    def dataset_files(self) -> list[Path]:
        """The `dataset` entries: under dataset_dir, else as given (relative to the current directory)."""
        files = []
        for entry in (e.strip() for e in self.basic.dataset.split(",")):
            if not entry:
                continue
            cand = [self.dataset_dir() / entry, Path(entry)]
            found = next((p for p in cand if p.is_file()), None)
            if found is None:
                raise FileNotFoundError(
                    f"dataset file {entry!r} not found (looked in {cand[0]} and {Path(entry).resolve()}); "
                    f"fix basic_parameters.dataset / dataset_dir{' in ' + self.source if self.source else ''}")
            files.append(found.resolve())
        if not files:
            raise ValueError("basic_parameters.dataset is empty; name at least one data file")
        return files


def climbs_out(rel: Path) -> bool:
    """Whether a relative media path leaves its root by `..`, judged on the path as written (normalised
    lexically, links not followed: a symlinked image or folder sits where its link is). What
    `allow_absolute_image_paths` allows; llava-to-mllm refuses it."""
    return os.path.normpath(rel).split(os.sep)[0] == os.pardir


def parse_data_config(raw: dict, source: str | None = None) -> DataConfig:
    """Validate a data.json dict; ValueError naming the file and each unknown key / bad value."""
    cfg = validate(DataConfig, raw, source)
    cfg.source = source
    return cfg


def load_data_config(path: str | os.PathLike) -> DataConfig:
    return parse_data_config(read_mapping(path, "json"), str(Path(path)))
