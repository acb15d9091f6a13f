"""GLM-4.5V (`glm4v_moe`): config, native model, 3D rope index."""

from mmtune.models.glm4v_moe.config import Glm4vMoeConfig, glm45v_config, glm46v_config, tiny_config
from mmtune.models.glm4v_moe.model import Glm4vMoeForConditionalGeneration, Glm4vMoeOutput, GlmVForConditionalGeneration, GlmVOutput
from mmtune.models.glm4v_moe.text import KVCache

__all__ = [
    "Glm4vMoeConfig",
    "Glm4vMoeForConditionalGeneration",
    "Glm4vMoeOutput",
    "GlmVForConditionalGeneration",
    "GlmVOutput",
    "KVCache",
    "glm45v_config",
    "glm46v_config",
    "tiny_config",
]
