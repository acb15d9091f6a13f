"""GLM-4.1V-9B-Thinking / GLM-4.6V-Flash (`glm4v`): GLM-4.5V's vision tower and everything around the
decoder (`GlmVForConditionalGeneration` of models/glm4v_moe), with the dense text decoder of text.py.
Parameter names equal transformers>=5's `Glm4vForConditionalGeneration` (either loads the other's state
dict). The output's `router_logits` is always empty.
"""

from __future__ import annotations

from mmtune.models.glm4v.checkpoint_names import StateDictAdapter
from mmtune.models.glm4v.config import Glm4vConfig
from mmtune.models.glm4v.text import DenseTextModel
from mmtune.models.glm4v_moe.model import GlmVForConditionalGeneration


class Glm4vForConditionalGeneration(GlmVForConditionalGeneration):
    config_class = Glm4vConfig
    adapter_class = StateDictAdapter

    def __init__(self, config: Glm4vConfig):
        super().__init__(config, DenseTextModel(config.text))
