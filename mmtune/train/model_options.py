"""model.json's runtime choices for the model's own modules, set from outside after the model is built:
the attention backend of each tower (`attn_implementation`, or --use-flash-attn for both) and the MoE
experts' grouped matmul (`use_npu_fused_moe`).

attn_implementation -> ops.attention backend:
- `flash_attention_2` / `flash_attention_3`: "flash", torch's varlen flash kernel over the packed samples
  of a batch (and the images of the vision tower) in one call; needs CUDA, bf16/fp16 and SM80+, else SDPA.
- `sdpa` (the recipe's): "sdpa", torch's scaled_dot_product_attention (it picks its own fused kernel);
  packed rows and images take one call each.
- `eager`: "eager", SDPA restricted to its plain math kernel (the reference numerics; slowest).
"""

from __future__ import annotations

from torch import nn

ATTN_BACKENDS = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "flash", "flash_attention_3": "flash"}


def attention_backends(model_json, use_flash_attn: bool = False) -> tuple[str, str]:
    """(vision tower, decoder) backends of ops.attention for a ModelJsonConfig."""
    if use_flash_attn:
        return "flash", "flash"
    return (ATTN_BACKENDS[model_json.image_encoder.vision_encoder.attn_implementation],
            ATTN_BACKENDS[model_json.text_decoder.attn_implementation])


def apply_model_options(model: nn.Module, *, vision_attn: str, text_attn: str, grouped_mm: bool) -> dict:
    """Set the attention backend of every attention module of each tower and the experts' grouped matmul;
    returns how many modules of each kind were set (a model without them is left as it is)."""
    from mmtune.distributed.parallelize import blocks_of

    vision_blocks, text_blocks = blocks_of(model)
    counts = {"vision_attn": 0, "text_attn": 0, "experts": 0}
    for blocks, backend, key in ((vision_blocks, vision_attn, "vision_attn"), (text_blocks, text_attn, "text_attn")):
        for block in blocks:
            for m in block.modules():
                if hasattr(m, "attn_backend"):
                    m.attn_backend = backend
                    counts[key] += 1
    for block in text_blocks:
        for m in block.modules():
            if hasattr(m, "use_grouped_mm"):
                m.use_grouped_mm = grouped_mm
                counts["experts"] += 1
    return counts
