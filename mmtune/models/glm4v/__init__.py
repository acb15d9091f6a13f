"""GLM-4.1V / GLM-4.6V-Flash (`glm4v`): dense decoder, GLM-4.5V's vision tower."""

from mmtune.models.glm4v.config import Glm4vConfig, glm41v_config, glm46v_flash_config, tiny_config
from mmtune.models.glm4v.model import Glm4vForConditionalGeneration

__all__ = ["Glm4vConfig", "Glm4vForConditionalGeneration", "glm41v_config", "glm46v_flash_config", "tiny_config"]
