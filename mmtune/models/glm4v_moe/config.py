"""GLM-4.5V (`glm4v_moe`) configuration: typed, read from an HF config.json in either style.

Both config.json styles are read: transformers>=5 `rope_parameters`, and the legacy
`rope_scaling` + `rope_theta` + `partial_rotary_factor`. Values always come from the file; the
defaults below are the real GLM-4.5V's (docs/GLM45V.md section 4), never transformers' defaults.
Keys this class does not model are kept in `extra` so that a round trip loses nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 10944  # dense MLP of the first `first_k_dense_replace` layers
    moe_intermediate_size: int = 1408
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-5
    attention_bias: bool = True
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: list[int] = field(default_factory=lambda: [8, 12, 12])
    n_routed_experts: int = 128
    n_shared_experts: int = 1
    num_experts_per_tok: int = 8
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    router_aux_loss_coef: float = 1e-4
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151329, 151336, 151338])
    pad_token_id: int | None = 151329
    num_nextn_predict_layers: int = 0  # MTP layers stored after the last decoder layer (not run)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return layer_idx >= self.first_k_dense_replace


@dataclass
class VisionConfig:
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 12
    intermediate_size: int = 10944
    out_hidden_size: int = 4096
    patch_size: int = 14
    image_size: int = 336
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one row of `pixel_values`: C * T * P * P (1176 for GLM-4.5V)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2


class ConfigFile:
    """config.json reading and writing shared by the family's configs (Glm4vMoeConfig, models/glm4v's
    Glm4vConfig): a dataclass with `text`, `vision`, `extra` and the multimodal token ids, whose class
    names its `model_type`, `architecture` and the model types of its two sub-configs. `from_dict` is
    shared; what differs between the configs (how the text and vision sections are found and read) is each
    one's `_text_and_vision`."""

    model_type: str
    architecture: str
    text_model_type: str
    vision_model_type: str
    family_name: str  # in errors: "mmtune's <family_name> reads model_type ..."

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config"):
        """The config of an HF config.json dict; unknown keys go to `extra`."""
        data = copy.deepcopy(data)
        model_type = data.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(f"{source}: model_type is {model_type!r}; mmtune's {cls.family_name} reads model_type "
                             f"{cls.model_type!r}")
        data.pop("model_type")
        data.pop("architectures", None)  # always written by to_dict()
        own = {f.name for f in dataclasses.fields(cls)} - {"text", "vision", "extra"}
        text, vision = cls._text_and_vision(data, own, source)
        kwargs = {k: data.pop(k) for k in own if k in data}
        if not kwargs.get("tie_word_embeddings") and text.tie_word_embeddings:
            kwargs["tie_word_embeddings"] = True  # a pre-v5 save keeps it inside text_config
        return cls(text=text, vision=vision, extra=data, **kwargs)

    @classmethod
    def _text_and_vision(cls, data: dict[str, Any], own: set[str], source: str):
        """(text config, vision config) read from `data`, whose keys for them are popped; `own` are the
        config's multimodal keys."""
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, path: str | Path):
        """Read `path/config.json` (or `path` itself when it is a file)."""
        path = Path(path)
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no config.json (expected an HF model dir with config.json)")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(file))

    def to_dict(self) -> dict[str, Any]:
        """An HF config.json (transformers>=5 style) that `AutoConfig.from_pretrained` reads."""
        t = self.text
        text = {k: v for k, v in dataclasses.asdict(t).items() if k not in TEXT_ROPE_KEYS | {"extra"}}
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": t.rope_theta,
            "partial_rotary_factor": t.partial_rotary_factor,
            "mrope_section": list(t.mrope_section),
        }
        text["model_type"] = self.text_model_type
        text.update(copy.deepcopy(t.extra))
        vision = {k: v for k, v in dataclasses.asdict(self.vision).items() if k != "extra"}
        vision["model_type"] = self.vision_model_type
        vision.update(copy.deepcopy(self.vision.extra))
        out: dict[str, Any] = {"architectures": [self.architecture], "model_type": self.model_type}
        out.update(copy.deepcopy(self.extra))
        out.update(text_config=text, vision_config=vision)
        for f in dataclasses.fields(self):
            if f.name not in ("text", "vision", "extra"):
                out[f.name] = getattr(self, f.name)
        return out

    def save_pretrained(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")


TEXT_ROPE_KEYS = {"rope_theta", "partial_rotary_factor", "mrope_section"}


@dataclass
class Glm4vMoeConfig(ConfigFile):
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151363
    video_token_id: int = 151364
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "glm4v_moe"
    architecture = "Glm4vMoeForConditionalGeneration"
    text_model_type = "glm4v_moe_text"
    vision_model_type = "glm4v_moe_vision"

    family_name = "GLM-4.5V model"

    # ---- reading (from_pretrained, from_dict: ConfigFile) -------------------------------------
    @classmethod
    def _text_and_vision(cls, data: dict[str, Any], own: set[str], source: str):
        text = _text_from_dict(data.pop("text_config", {}) or {}, source)
        return text, _dataclass_from_dict(VisionConfig, data.pop("vision_config", {}) or {}, source, "vision_config")


def read_rope(d: dict[str, Any], source: str) -> dict[str, Any]:
    """A text_config dict with its rope settings as plain keys: transformers>=5 `rope_parameters` or the
    legacy `rope_scaling` (+ top-level `rope_theta` / `partial_rotary_factor`); model_type dropped."""
    d = dict(d)
    d.pop("model_type", None)
    rope = dict(d.pop("rope_parameters", None) or d.pop("rope_scaling", None) or {})
    d.pop("rope_scaling", None)
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            d.setdefault(key, rope[key])
    if "mrope_section" in rope:
        d["mrope_section"] = list(rope["mrope_section"])
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"{source}: text_config rope type {rope_type!r} is not supported (expected 'default')")
    return d


def _text_from_dict(d: dict[str, Any], source: str) -> TextConfig:
    d = read_rope(d, source)
    if d.get("head_dim") is None:
        d["head_dim"] = d.get("hidden_size", TextConfig.hidden_size) // d.get(
            "num_attention_heads", TextConfig.num_attention_heads
        )
    return check_mrope(_dataclass_from_dict(TextConfig, d, source, "text_config"), source)


def check_mrope(text, source: str):
    """`text` (a text config), after checking that its mrope sections cover the rotary half-dims."""
    if sum(text.mrope_section) * 2 != text.rotary_dim:
        raise ValueError(
            f"{source}: text_config mrope_section {text.mrope_section} sums to {sum(text.mrope_section)}, but "
            f"head_dim * partial_rotary_factor / 2 = {text.rotary_dim // 2} (head_dim {text.head_dim}, "
            f"partial_rotary_factor {text.partial_rotary_factor})"
        )
    return text


def _dataclass_from_dict(cls, d: dict[str, Any], source: str, section: str):
    names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
    known = {k: v for k, v in d.items() if k in names}
    extra = {k: v for k, v in d.items() if k not in names and k != "model_type"}
    try:
        return cls(**known, extra=extra)
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ValueError(f"{source}: {section}: {e}") from e


def glm45v_config() -> Glm4vMoeConfig:
    """The real zai-org/GLM-4.5V configuration (docs/GLM45V.md section 4)."""
    return Glm4vMoeConfig()


def glm46v_config() -> Glm4vMoeConfig:
    """zai-org/GLM-4.6V: GLM-4.5V's architecture and shapes (106B total, 12B active) with a 128K context
    window (docs/GLM45V.md section 8 lists the sources)."""
    c = Glm4vMoeConfig()
    c.text.max_position_embeddings = 131072
    return c


def tiny_config() -> Glm4vMoeConfig:
    """The embedded default: a tiny GLM-4.5V-architecture model (under 1M params) that learns the shapes
    task on a CPU in minutes. 3 decoder layers (1 dense + 2 MoE), 4 experts top-2, 2 vision blocks, and
    the tiny tokenizer's 512-id vocabulary (special tokens at mmtune.tokens.TINY_SPECIAL_BASE)."""
    from mmtune.tokens import TINY_SPECIAL_BASE, TINY_VOCAB_SIZE, model_token_ids

    ids = model_token_ids(TINY_SPECIAL_BASE)
    text = TextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        mrope_section=[2, 3, 3],
        max_position_embeddings=4096,
        n_routed_experts=4,
        n_shared_experts=1,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        num_nextn_predict_layers=1,
        eos_token_id=ids.pop("eos_token_id"),
        pad_token_id=ids.pop("pad_token_id"),
    )
    vision = VisionConfig(
        depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128, image_size=56
    )
    return Glm4vMoeConfig(text=text, vision=vision, **ids)
