"""The recipe's model.json (`--mm-model`) and fsdp2 yaml (`--fsdp2-config-path`) as strict pydantic models
(keys: docs/RECIPE.md). `mmtune train`'s flags and their resolution into one TrainConfig are in
train/args.py, which holds these two as `TrainConfig.model` and `TrainConfig.fsdp2`."""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field

from mmtune.config_files import DTYPE_NAMES, StrictModel, read_mapping, validate

# model.json loss_cfg.loss_type (semantics: mmtune/train/loss.py, which checks against this list)
LOSS_TYPES = ("default", "per_sample_loss", "per_token_loss", "token_loss", "square_loss")


# --------------------------------------------------------------------------- model.json


_Strict = StrictModel


class VisionEncoderConfig(_Strict):
    """model.json `image_encoder.vision_encoder`. Architecture numbers are informational: the
    architecture always comes from `init_from_hf_path`'s config.json (the recipe says the same); a
    `model_id` given here must belong to it (`glm4v_moe` / `glm4v`; checked when training starts)."""

    model_id: str | None = None
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    freeze: bool = True
    attn_implementation: str = "sdpa"


class VisionProjectorConfig(_Strict):
    """model.json `image_encoder.vision_projector` (the patch merger / downsample)."""

    model_id: str = "lnmlp"
    num_layers: int | None = None
    freeze: bool = True


class ImageEncoderConfig(_Strict):
    vision_encoder: VisionEncoderConfig = VisionEncoderConfig()
    vision_projector: VisionProjectorConfig = VisionProjectorConfig()


class TextDecoderConfig(_Strict):
    """model.json `text_decoder`; `freeze` covers the embeddings, decoder layers, final norm and lm head.
    `use_npu_fused_moe` selects the grouped-GEMM MoE path (the recipe's fused NPU kernels)."""

    model_id: str | None = None  # glm_4v_moe_text (GLM-4.5V) or glm4v_text (GLM-4.1V); checked like model_id
    num_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    freeze: bool = False
    use_npu_fused_moe: bool = True
    attn_implementation: str = "sdpa"
    activation_offload: bool = False


class LossConfig(_Strict):
    """model.json `loss_cfg` (semantics: mmtune/train/loss.py). `router_aux_loss_coef` 0 turns the
    router's load-balancing loss off (transformers' default: output_router_logits=False)."""

    compute_mode: Literal["default", "chunk"] = "default"
    chunk_size: int = Field(1024, gt=0)
    loss_type: Literal[LOSS_TYPES] = "default"
    router_aux_loss_coef: float = Field(0.0, ge=0.0)


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


class ModelJsonConfig(_Strict):
    """The recipe's model.json (`--mm-model`), e.g. examples/glm4.5v/model_106B.json (keys: docs/RECIPE.md).
    `model_id` (`glm4v_moe` or `glm4v`) must agree with init_from_hf_path's config.json `model_type` when given."""

    model_id: str | None = None
    init_from_hf_path: str | None = None
    image_encoder: ImageEncoderConfig = ImageEncoderConfig()
    text_decoder: TextDecoderConfig = TextDecoderConfig()
    loss_cfg: LossConfig = LossConfig()
    patch: dict[str, Any] = Field(default_factory=dict)  # MindSpeed monkey-patch switches: ignored

    # conveniences for the trainer
    @property
    def freeze_vision_encoder(self) -> bool:
        return self.image_encoder.vision_encoder.freeze

    @property
    def freeze_vision_projector(self) -> bool:
        return self.image_encoder.vision_projector.freeze

    @property
    def freeze_text_decoder(self) -> bool:
        """Embeddings, decoder layers, final norm and lm head."""
        return self.text_decoder.freeze

    @property
    def grouped_gemm(self) -> bool:
        return self.text_decoder.use_npu_fused_moe

    @property
    def attn_implementation(self) -> str:
        return self.text_decoder.attn_implementation

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ModelJsonConfig":
        data = read_mapping(path, "json")
        cfg = validate(cls, data, path)
        for where in (cfg.text_decoder.attn_implementation, cfg.image_encoder.vision_encoder.attn_implementation):
            if where not in ATTN_IMPLEMENTATIONS:
                raise ValueError(f"{path}: attn_implementation {where!r} is not one of {ATTN_IMPLEMENTATIONS}")
        return cfg


# --------------------------------------------------------------------------- fsdp2 yaml


class Fsdp2Config(_Strict):
    """The recipe's fsdp2 yaml (`--fsdp2-config-path`), e.g. examples/glm4.5v/fsdp2_config.yaml (keys: docs/RECIPE.md).

    - sharding_size: "auto" = all data-parallel ranks (plain FSDP); an int n < world size = HSDP,
      shard within groups of n ranks and replicate across groups.
    - reshard_after_forward: free the unsharded params after forward (re-gather in backward).
    - param_dtype / reduce_dtype: FSDP2 MixedPrecisionPolicy on CUDA; on CPU training is fp32.
    - cast_forward_inputs: cast floating inputs of each sharded module to param_dtype.
    - num_to_forward_prefetch / num_to_backward_prefetch: how many following blocks to all-gather
      ahead (0 = FSDP2's default implicit prefetch of one).
    - offload_to_cpu: FSDP2 CPUOffloadPolicy (params, grads and optimizer step on the CPU).
    - align_fsdp_param_groups: MindSpeed-MM splits each block's FSDP group so that one group holds only
      Linear weights (aligned shards for Ascend collectives). mmtune shards one group per block and
      does not split them: accepted, no effect (a warning says so when true).
    """

    sharding_size: int | Literal["auto"] = "auto"
    reshard_after_forward: bool = True
    param_dtype: str = "bf16"
    reduce_dtype: str = "fp32"
    cast_forward_inputs: bool = True
    num_to_forward_prefetch: int = Field(0, ge=0)
    num_to_backward_prefetch: int = Field(0, ge=0)
    offload_to_cpu: bool = False
    align_fsdp_param_groups: bool = False

    @property
    def param_torch_dtype(self):
        import torch

        return getattr(torch, DTYPE_NAMES[self.param_dtype])

    @property
    def reduce_torch_dtype(self):
        import torch

        return getattr(torch, DTYPE_NAMES[self.reduce_dtype])

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Fsdp2Config":
        cfg = validate(cls, read_mapping(path, "yaml"), path)
        for key in ("param_dtype", "reduce_dtype"):
            if getattr(cfg, key) not in DTYPE_NAMES:
                raise ValueError(f"{path}: {key} {getattr(cfg, key)!r} is not one of {sorted(DTYPE_NAMES)}")
        if isinstance(cfg.sharding_size, int) and cfg.sharding_size < 1:
            raise ValueError(f"{path}: sharding_size must be 'auto' or a positive int, got {cfg.sharding_size}")
        return cfg
