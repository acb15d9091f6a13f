"""The GLM-V architectures mmtune knows, by config.json `model_type` (docs/INTERNALS.md "Architectures").

One `Architecture` per model type names everything the rest of mmtune needs about it: the config,
model and state-dict adapter classes, the tiny config of `make-tiny` / `demo`, the `mmtune plan` presets,
the model.json `model_id`s that belong to it, whether it has routed experts (expert parallelism,
the router aux loss and LoRA on experts ask `has_experts` / `num_experts(config)`), and which Linear
names PEFT would move onto the routed experts (`peft_fused_names`, for the PEFT adapter export).

    arch = architecture_of(hf_dir)             # from config.json's model_type
    config = arch.config_class.from_pretrained(hf_dir)   # or: arch, config = load_config(hf_dir)
    model = arch.model_class.from_pretrained(hf_dir)
    adapter = arch.adapter_class(config)       # shapes, from_hub, to_hub, knows_hub_name, hub_names_and_shapes

Nothing else in mmtune names a model class: a new architecture is one entry here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmtune.models import glm4v, glm4v_moe


@dataclass(frozen=True)
class ModelIds:
    """The model.json `model_id`s of an architecture (MindSpeed-MM's names; the first is the one to write)."""

    model: tuple[str, ...]
    vision_encoder: tuple[str, ...]
    text_decoder: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json `model_type`
    name: str  # for messages: the models of this type
    model_class: type  # (config) -> nn.Module; .from_pretrained(dir); .config_class; .adapter_class
    hf_class_name: str  # transformers' class of the same architecture (parameter names are equal)
    tiny_config: Callable[[], Any]
    presets: dict[str, Callable[[], Any]]
    model_ids: ModelIds
    has_experts: bool
    # Linear module names that PEFT's transformers-5 weight conversion for this model type rewrites into
    # targets on the stacked routed experts; a PEFT export names such Linears by parameter instead
    # (convert/lora_export.py)
    peft_fused_names: tuple[str, ...] = ()

    @property
    def config_class(self) -> type:
        return self.model_class.config_class

    @property
    def adapter_class(self) -> type:
        return self.model_class.adapter_class

    def num_experts(self, config) -> int:
        """Routed experts per MoE layer (0 for a dense model)."""
        return int(config.text.n_routed_experts) if self.has_experts else 0

    def require_experts(self, what: str) -> None:
        """ValueError when `what` (a flag or config key) needs routed experts and this model has none."""
        if not self.has_experts:
            raise ValueError(f"{what} needs a model with routed experts, but model_type {self.model_type!r} "
                             f"({self.name}) is dense: it has no experts")

    def check_model_ids(self, model_json: dict[str, str | None], source: str, config_source: str) -> None:
        """ValueError naming both files when a model.json `model_id` (given ones only: {"model": ...,
        "vision_encoder": ..., "text_decoder": ...}) belongs to another architecture than config.json's."""
        for part, given in model_json.items():
            allowed = getattr(self.model_ids, part)
            if given is not None and given not in allowed:
                key = "model_id" if part == "model" else f"{_JSON_PATH[part]}.model_id"
                raise ValueError(
                    f"{source}: {key} {given!r} contradicts {config_source}'s model_type {self.model_type!r} "
                    f"({self.name}); write {allowed[0]!r} there (model.json names the architecture of "
                    "init_from_hf_path), or point init_from_hf_path at a model of that architecture")


_JSON_PATH = {"vision_encoder": "image_encoder.vision_encoder", "text_decoder": "text_decoder"}

ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture(
            model_type="glm4v_moe", name="GLM-4.5V / GLM-4.6V, MoE", model_class=glm4v_moe.Glm4vMoeForConditionalGeneration,
            hf_class_name="Glm4vMoeForConditionalGeneration", tiny_config=glm4v_moe.tiny_config,
            presets={"glm4.5v": glm4v_moe.glm45v_config, "glm4.6v": glm4v_moe.glm46v_config},
            model_ids=ModelIds(model=("glm4v_moe",), vision_encoder=("glm4v_moe",),
                               text_decoder=("glm_4v_moe_text", "glm4v_moe_text")),
            has_experts=True, peft_fused_names=("gate_proj", "up_proj", "down_proj"),
        ),
        Architecture(
            model_type="glm4v", name="GLM-4.1V / GLM-4.6V-Flash, dense", model_class=glm4v.Glm4vForConditionalGeneration,
            hf_class_name="Glm4vForConditionalGeneration", tiny_config=glm4v.tiny_config,
            presets={"glm4.1v-9b": glm4v.glm41v_config, "glm4.6v-flash": glm4v.glm46v_flash_config},
            model_ids=ModelIds(model=("glm4v",), vision_encoder=("glm4v",), text_decoder=("glm4v_text",)),
            has_experts=False,
        ),
    )
}
DEFAULT_ARCH = "glm4v_moe"


def get_architecture(model_type: str) -> Architecture:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not one mmtune knows: {', '.join(ARCHITECTURES)}") from None


def architecture_of(hf_dir: str | Path) -> Architecture:
    """The architecture of an HF model dir, from its config.json `model_type`."""
    file = Path(hf_dir) / "config.json" if Path(hf_dir).is_dir() else Path(hf_dir)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no config.json (expected an HF model dir with config.json)")
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from e
    if model_type not in ARCHITECTURES:
        raise ValueError(f"{file}: model_type {model_type!r} is not one mmtune knows: {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[model_type]


def architecture_for_config(config) -> Architecture:
    """The architecture of a config object (its class's `model_type`)."""
    return get_architecture(type(config).model_type)


def load_config(hf_dir: str | Path) -> tuple[Architecture, Any]:
    """(architecture, config) of an HF model dir."""
    arch = architecture_of(hf_dir)
    return arch, arch.config_class.from_pretrained(hf_dir)


def presets() -> dict[str, tuple[Architecture, Callable[[], Any]]]:
    """Every `mmtune plan` preset name -> (architecture, config factory); plus "tiny" (GLM-4.5V's) and
    "tiny-<model_type>" for each architecture."""
    out: dict[str, tuple[Architecture, Callable[[], Any]]] = {}
    for arch in ARCHITECTURES.values():
        out.update((name, (arch, make)) for name, make in arch.presets.items())
        out[f"tiny-{arch.model_type}"] = (arch, arch.tiny_config)
    out["tiny"] = out[f"tiny-{DEFAULT_ARCH}"]
    return out
