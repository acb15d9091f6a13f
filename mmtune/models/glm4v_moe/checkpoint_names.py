"""Hub names <-> native names for GLM-4.5V checkpoints: the only place that knows both.

Hub layout (zai-org/GLM-4.5V, what `make-tiny` writes): one tensor per expert per projection,
    model.language_model.layers.{i}.mlp.experts.{e}.{gate,up}_proj.weight   [I, H]
    model.language_model.layers.{i}.mlp.experts.{e}.down_proj.weight        [H, I]
Native layout (transformers>=5 in-memory names, mmtune's model and DCP checkpoints): stacked,
    model.language_model.layers.{i}.mlp.experts.gate_up_proj   [E, 2I, H]  (per expert: cat(gate, up) on dim 0)
    model.language_model.layers.{i}.mlp.experts.down_proj      [E, H, I]
Every other name is the same in both. Tensors of layers >= num_hidden_layers (the MTP layer) and
names the model does not know pass through untouched, whatever their layout.

Legend: E experts, I moe_intermediate_size, H hidden size.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from mmtune.models.glm4v_moe.config import Glm4vMoeConfig

_LAYER_PREFIX = "model.language_model.layers."
_EXPERT_HUB_RE = re.compile(
    r"^model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$"
)
_EXPERT_NATIVE_RE = re.compile(r"^model\.language_model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def is_expert_hub_name(name: str) -> bool:
    """True for a per-expert hub tensor name (`...mlp.experts.{e}.{gate,up,down}_proj.weight`), any layer."""
    return _EXPERT_HUB_RE.match(name) is not None


def native_shapes(config: Glm4vMoeConfig) -> dict[str, tuple[int, ...]]:
    """Every native tensor name of the model (parameters and persistent buffers) -> its shape.

    Equal to `Glm4vMoeForConditionalGeneration(config).state_dict()` of transformers>=5 (pinned by a test);
    conversion checks tensors against it so a checkpoint that disagrees with config.json fails by name.
    """
    t = config.text
    shapes = vision_shapes(config.vision)
    H = t.hidden_size
    shapes["model.language_model.embed_tokens.weight"] = (t.vocab_size, H)
    for i in range(t.num_hidden_layers):
        p = f"{_LAYER_PREFIX}{i}."
        shapes.update(attention_shapes(t, p))
        if t.is_moe_layer(i):
            E, I = t.n_routed_experts, t.moe_intermediate_size
            S = I * t.n_shared_experts
            shapes[p + "mlp.experts.gate_up_proj"] = (E, 2 * I, H)
            shapes[p + "mlp.experts.down_proj"] = (E, H, I)
            shapes[p + "mlp.gate.weight"] = (E, H)
            shapes[p + "mlp.gate.e_score_correction_bias"] = (E,)
            shapes[p + "mlp.shared_experts.gate_proj.weight"] = (S, H)
            shapes[p + "mlp.shared_experts.up_proj.weight"] = (S, H)
            shapes[p + "mlp.shared_experts.down_proj.weight"] = (H, S)
        else:
            shapes[p + "mlp.gate_proj.weight"] = (t.intermediate_size, H)
            shapes[p + "mlp.up_proj.weight"] = (t.intermediate_size, H)
            shapes[p + "mlp.down_proj.weight"] = (H, t.intermediate_size)
        shapes[p + "input_layernorm.weight"] = (H,)
        shapes[p + "post_attention_layernorm.weight"] = (H,)
    shapes["model.language_model.norm.weight"] = (H,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (t.vocab_size, H)
    return shapes


def vision_shapes(v) -> dict[str, tuple[int, ...]]:
    """`model.visual.*` tensor shapes of a vision config (the whole GLM-V family shares the tower)."""
    shapes: dict[str, tuple[int, ...]] = {}
    vis = "model.visual."
    n_pos = (v.image_size // v.patch_size) ** 2
    shapes[vis + "embeddings.position_embedding.weight"] = (n_pos, v.hidden_size)
    shapes[vis + "patch_embed.proj.weight"] = (v.hidden_size, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size)
    shapes[vis + "patch_embed.proj.bias"] = (v.hidden_size,)
    for b in range(v.depth):
        p = f"{vis}blocks.{b}."
        shapes[p + "norm1.weight"] = (v.hidden_size,)
        shapes[p + "norm2.weight"] = (v.hidden_size,)
        shapes[p + "attn.qkv.weight"] = (3 * v.hidden_size, v.hidden_size)
        if v.attention_bias:
            shapes[p + "attn.qkv.bias"] = (3 * v.hidden_size,)
        shapes[p + "attn.proj.weight"] = (v.hidden_size, v.hidden_size)
        # the blocks' MLP width is out_hidden_size (as in transformers); intermediate_size is the merger's
        shapes[p + "mlp.gate_proj.weight"] = (v.out_hidden_size, v.hidden_size)
        shapes[p + "mlp.up_proj.weight"] = (v.out_hidden_size, v.hidden_size)
        shapes[p + "mlp.down_proj.weight"] = (v.hidden_size, v.out_hidden_size)
    o = v.out_hidden_size
    shapes[vis + "merger.proj.weight"] = (o, o)
    shapes[vis + "merger.post_projection_norm.weight"] = (o,)
    shapes[vis + "merger.post_projection_norm.bias"] = (o,)
    shapes[vis + "merger.gate_proj.weight"] = (v.intermediate_size, o)
    shapes[vis + "merger.up_proj.weight"] = (v.intermediate_size, o)
    shapes[vis + "merger.down_proj.weight"] = (o, v.intermediate_size)
    shapes[vis + "post_conv_layernorm.weight"] = (v.hidden_size,)
    m = v.spatial_merge_size
    shapes[vis + "downsample.weight"] = (o, v.hidden_size, m, m)
    shapes[vis + "downsample.bias"] = (o,)
    shapes[vis + "post_layernorm.weight"] = (v.hidden_size,)
    return shapes


def attention_shapes(t, prefix: str) -> dict[str, tuple[int, ...]]:
    """`{prefix}self_attn.*` shapes of one decoder layer (MoE and dense text configs alike)."""
    H, D = t.hidden_size, t.head_dim
    q, kv = t.num_attention_heads * D, t.num_key_value_heads * D
    shapes: dict[str, tuple[int, ...]] = {}
    for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
        shapes[prefix + f"self_attn.{proj}.weight"] = (out, H)
        if t.attention_bias:
            shapes[prefix + f"self_attn.{proj}.bias"] = (out,)
    shapes[prefix + "self_attn.o_proj.weight"] = (H, q)
    return shapes


class StateDictAdapter:
    """Converts GLM-4.5V state dicts between the hub layout and the native (merged-expert) layout."""

    def __init__(self, config: Glm4vMoeConfig):
        self.config = config
        self.shapes = native_shapes(config)

    # ---- hub -> native -------------------------------------------------------------------------
    def from_hub(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield native (name, tensor) for hub items, streaming.

        A model layer's per-expert tensors are copied into their stacked tensor as they arrive (no
        second copy is held); once all E of one stacked tensor are in (gate and up for `gate_up_proj`,
        down for `down_proj`) it is yielded; other tensors are yielded as they come (already-merged
        ones too). Peak memory: the stacked tensors of the layers in flight. Shapes of
        known names are checked against config. Raises ValueError naming the tensor on a shape or dtype
        mismatch, a duplicate, an expert index out of range, or (at the end) a missing expert.
        """
        t = self.config.text
        E, I, H = t.n_routed_experts, t.moe_intermediate_size, t.hidden_size
        # (layer, "gate_up_proj" | "down_proj") -> (stacked tensor being filled, {(expert, proj)} filled)
        pending: dict[tuple[int, str], tuple[torch.Tensor, set[tuple[int, str]]]] = {}
        seen: set[str] = set()
        for name, tensor in items:
            if name in seen:
                raise ValueError(f"tensor {name} appears twice in the checkpoint")
            seen.add(name)
            m = _EXPERT_HUB_RE.match(name)
            if m is None or int(m["layer"]) >= t.num_hidden_layers:  # not an expert of a model layer
                self._check_shape(name, tensor)
                yield name, tensor
                continue
            layer, expert, proj = int(m["layer"]), int(m["expert"]), m["proj"]
            if not t.is_moe_layer(layer):
                raise ValueError(
                    f"tensor {name}: layer {layer} is a dense layer in config.json "
                    f"(first_k_dense_replace={t.first_k_dense_replace}) but the checkpoint has experts for it"
                )
            if expert >= E:
                raise ValueError(f"tensor {name}: expert {expert} out of range, config.json has n_routed_experts={E}")
            want = (H, I) if proj == "down_proj" else (I, H)
            if tuple(tensor.shape) != want:
                raise ValueError(
                    f"tensor {name}: shape {tuple(tensor.shape)} disagrees with config.json "
                    f"(expected {want} from hidden_size={H}, moe_intermediate_size={I})"
                )
            kind = "down_proj" if proj == "down_proj" else "gate_up_proj"
            if (layer, kind) not in pending:  # the stacked tensor is filled in place: no second copy
                shape = (E, H, I) if kind == "down_proj" else (E, 2 * I, H)
                pending[(layer, kind)] = (torch.empty(shape, dtype=tensor.dtype), set())
            stacked, filled = pending[(layer, kind)]
            if tensor.dtype != stacked.dtype:
                raise ValueError(
                    f"tensor {name}: dtype {tensor.dtype} differs from the layer's other experts ({stacked.dtype}); "
                    "all experts of a layer must share one dtype"
                )
            rows = {"down_proj": slice(None), "gate_proj": slice(0, I), "up_proj": slice(I, 2 * I)}[proj]
            stacked[expert, rows] = tensor
            filled.add((expert, proj))
            if len(filled) == (E if kind == "down_proj" else 2 * E):
                del pending[(layer, kind)]
                yield f"{_LAYER_PREFIX}{layer}.mlp.experts.{kind}", stacked
        if pending:
            (layer, kind), (_, filled) = sorted(pending.items(), key=lambda kv: kv[0])[0]
            projs = ("down_proj",) if kind == "down_proj" else ("gate_proj", "up_proj")
            missing = [(e, p) for e in range(E) for p in projs if (e, p) not in filled]
            e, p = missing[0]
            raise ValueError(
                f"tensor {_LAYER_PREFIX}{layer}.mlp.experts.{e}.{p}.weight is missing from the checkpoint "
                f"({len(missing)} expert tensor(s) of layer {layer} missing; config.json has n_routed_experts={E})"
            )

    def _check_shape(self, name: str, tensor: torch.Tensor) -> None:
        want = self.shapes.get(name)
        if want is not None and tuple(tensor.shape) != want:
            raise ValueError(f"tensor {name}: shape {tuple(tensor.shape)} disagrees with config.json (expected {want})")

    # ---- native -> hub -------------------------------------------------------------------------
    def hub_slices(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int | slice, ...]]]:
        """Where each hub tensor of native tensor `name` (of `shape`) lives inside it: `[(hub name, index)]`
        with `native[index]` == that hub tensor (in expert order, gate before up). A name stored the same in
        both layouts gives `[(name, ())]`. The one definition of the expert split: `to_hub` and the sharded
        HF reader (train/hf_load.py), which reads only the part of each hub tensor a rank owns, use it."""
        m = _EXPERT_NATIVE_RE.match(name)
        if m is None or int(m["layer"]) >= self.config.text.num_hidden_layers:
            return [(name, ())]
        want = self.shapes.get(name)
        if want is not None and tuple(shape) != want:
            raise ValueError(f"tensor {name}: shape {tuple(shape)} disagrees with config.json (expected {want})")
        prefix = f"{_LAYER_PREFIX}{m['layer']}.mlp.experts"
        if m["kind"] == "down_proj":
            return [(f"{prefix}.{e}.down_proj.weight", (e,)) for e in range(shape[0])]
        I = shape[1] // 2
        out: list[tuple[str, tuple[int | slice, ...]]] = []
        for e in range(shape[0]):
            out.append((f"{prefix}.{e}.gate_proj.weight", (e, slice(0, I))))
            out.append((f"{prefix}.{e}.up_proj.weight", (e, slice(I, 2 * I))))
        return out

    def to_hub(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Split a stacked expert tensor of a model layer into per-expert hub tensors (views, in expert
        order, gate before up); any other tensor is returned as `[(name, tensor)]`."""
        return [(hub, tensor[index]) for hub, index in self.hub_slices(name, tuple(tensor.shape))]

    def knows_hub_name(self, name: str) -> bool:
        """True for a hub tensor the model holds (its experts in hub layout included); false for the MTP
        layer and extras, which conversion carries over from the original dir."""
        if name in self.shapes:
            return True
        m = _EXPERT_HUB_RE.match(name)
        return m is not None and int(m["layer"]) < self.config.text.num_hidden_layers

    def hub_names_and_shapes(self, name: str, shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """What `to_hub` would return for a tensor of this name and shape, without the data (planning)."""
        return [(n, tuple(x.shape)) for n, x in self.to_hub(name, torch.empty(shape, device="meta"))]
