"""GLM-4.1V / GLM-4.6V-Flash (`glm4v`, dense) configuration: typed, read from an HF config.json.

The vision tower is GLM-4.5V's (`VisionConfig` of models/glm4v_moe); the text decoder is dense and has
its own, smaller set of keys (no experts, no head_dim: heads are hidden_size / num_attention_heads, as
transformers' `Glm4vTextAttention` computes them). The defaults are the real GLM-4.1V-9B-Thinking's
(docs/GLM45V.md section 8).

Reading follows transformers 5.24's `Glm4vConfig` where a key is missing: `partial_rotary_factor`
defaults to 1.0 and `pad_token_id` to None (the real config.json files carry both), the vision
`intermediate_size` to 13696. Both config.json styles are read: transformers>=5 `rope_parameters`, the
legacy `rope_scaling` + `rope_theta` + `partial_rotary_factor`; and the text keys either under
`text_config` or (a pre-4.57 save) at the top level. Unknown keys go to `extra`, so nothing is lost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmtune.models.glm4v_moe.config import ConfigFile, VisionConfig, _dataclass_from_dict, check_mrope, read_rope

# transformers' Glm4vVisionConfig default, GLM-4.1V's value (GLM-4.5V's vision merger is 10944 wide)
DENSE_VISION_INTERMEDIATE = 13696


@dataclass
class TextConfig:
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    hidden_act: str = "silu"
    max_position_embeddings: int = 65536
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: list[int] = field(default_factory=lambda: [8, 12, 12])
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    eos_token_id: int | list[int] | None = field(default_factory=lambda: [151329, 151336, 151338, 151348])
    pad_token_id: int | None = 151329
    extra: dict[str, Any] = field(default_factory=dict)

    # what the shared attention and the planner read (transformers: q/k/v always carry a bias)
    attention_bias = True
    norms_per_layer = 4  # input, post-self-attention, post-attention, post-MLP RMSNorms
    # q/k/v in one tensor (v a view of it: autograd keeps it all); the MLP's gate/up through ops/fused.swiglu
    fused_projections = True

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_moe_layer(self, layer_idx: int) -> bool:  # the same question the MoE config answers
        return False


@dataclass
class Glm4vConfig(ConfigFile):
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(intermediate_size=DENSE_VISION_INTERMEDIATE))
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    model_type = "glm4v"
    architecture = "Glm4vForConditionalGeneration"
    text_model_type = "glm4v_text"
    vision_model_type = "glm4v_vision"
    family_name = "dense GLM-4.1V model"

    # ---- reading (from_pretrained, from_dict, to_dict, save_pretrained: ConfigFile) --------------
    @classmethod
    def _text_and_vision(cls, data: dict[str, Any], own: set[str], source: str):
        if "text_config" in data:
            text_dict = data.pop("text_config") or {}
        else:  # legacy: the text keys at the top level, beside the multimodal ones
            text_dict = {k: data.pop(k) for k in list(data) if k not in own and k != "vision_config"}
        vision_dict = dict(data.pop("vision_config", {}) or {})
        vision_dict.setdefault("intermediate_size", DENSE_VISION_INTERMEDIATE)
        return (_text_from_dict(text_dict, source),
                _dataclass_from_dict(VisionConfig, vision_dict, source, "vision_config"))


def _text_from_dict(d: dict[str, Any], source: str) -> TextConfig:
    d = read_rope(d, source)
    d.setdefault("partial_rotary_factor", 1.0)  # transformers' default when the file has none
    d.setdefault("pad_token_id", None)
    cfg = _dataclass_from_dict(TextConfig, d, source, "text_config")
    head_dim = cfg.extra.get("head_dim")
    if head_dim is not None and head_dim != cfg.head_dim:
        raise ValueError(
            f"{source}: text_config head_dim {head_dim} differs from hidden_size / num_attention_heads = "
            f"{cfg.head_dim}; the dense GLM-4.1V attention (as transformers') always uses the latter"
        )
    if cfg.hidden_size % cfg.num_attention_heads or cfg.num_attention_heads % cfg.num_key_value_heads:
        raise ValueError(
            f"{source}: text_config hidden_size {cfg.hidden_size} must be a multiple of num_attention_heads "
            f"{cfg.num_attention_heads}, which must be a multiple of num_key_value_heads {cfg.num_key_value_heads}"
        )
    return check_mrope(cfg, source)


# ---- presets (docs/GLM45V.md section 8) -------------------------------------------------
def glm41v_config() -> Glm4vConfig:
    """zai-org/GLM-4.1V-9B-Thinking: 40 dense layers 4096 wide, GQA 32/2, 64K positions."""
    return Glm4vConfig()


def glm46v_flash_config() -> Glm4vConfig:
    """zai-org/GLM-4.6V-Flash: GLM-4.1V-9B's shapes (the hub's parameter count, 10,292,777,472, is that
    model's exactly) with a 128K context window."""
    c = Glm4vConfig()
    c.text.max_position_embeddings = 131072
    return c


def tiny_config() -> Glm4vConfig:
    """The dense embedded default: GLM-4.1V architecture at the size of the tiny GLM-4.5V (2 layers 128
    wide, GQA 4/2; the same 2-block vision tower and the tiny tokenizer's 512-id vocabulary)."""
    from mmtune.tokens import TINY_SPECIAL_BASE, TINY_VOCAB_SIZE, model_token_ids

    ids = model_token_ids(TINY_SPECIAL_BASE)
    text = TextConfig(
        vocab_size=TINY_VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        mrope_section=[2, 3, 3],
        max_position_embeddings=4096,
        eos_token_id=ids.pop("eos_token_id"),
        pad_token_id=ids.pop("pad_token_id"),
    )
    vision = VisionConfig(depth=2, hidden_size=64, num_heads=2, intermediate_size=128, out_hidden_size=128, image_size=56)
    return Glm4vConfig(text=text, vision=vision, **ids)
