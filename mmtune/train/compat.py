"""Settings mmtune accepts for compatibility with MindSpeed-MM but does not act on, and why.

`mmtune train` prints them in ONE line at startup (rank 0), grouped by reason:

    mmtune train: accepted for compatibility, no effect here: --swiglu, --use-mcore-models (configure
    Megatron/Ascend internals); data.json dataloader_param.drop_last=false (mmtune's sampler ...); ...

Settings whose value is what mmtune does anyway (the recipe's `use_fast_tokenizer: true`,
`drop_last: true`, model.json sizes equal to config.json's, ...) are honoured and not listed; a different
value is listed. Every other accepted key and flag is used (docs/RECIPE.md has the table;
tests/test_settings_used.py proves it on the recipe's files).

`static_items` needs only the files (parse time); `runtime_items` the device and the --load source.
"""

from __future__ import annotations

from collections.abc import Iterable

MEGATRON = "they configure Megatron/Ascend internals"
FLAG_REASONS = {
    "--use-torch-fsdp2": "mmtune always shards with FSDP2",
    "--init-model-with-meta-device": "mmtune always builds the model on the meta device and loads each rank's shard",
}
# names the recipe's files use for what mmtune does (other values are listed)
SAMPLERS = (None, "BaseRandomBatchSampler", "stateful_distributed_sampler")
# (model_id, vision_encoder.model_id and text_decoder.model_id are checked against config.json when
# training starts: train/cli.check_model_json; only the projector's id is informational)
MODEL_IDS = {
    "image_encoder.vision_projector.model_id": ("lnmlp",),
}
# model.json size -> the config.json value (text_config / vision_config) it must equal
SIZES = {
    "image_encoder.vision_encoder.num_layers": ("vision_config", "depth"),
    "image_encoder.vision_encoder.hidden_size": ("vision_config", "hidden_size"),
    "image_encoder.vision_encoder.num_attention_heads": ("vision_config", "num_heads"),
    "text_decoder.num_layers": ("text_config", "num_hidden_layers"),
    "text_decoder.hidden_size": ("text_config", "hidden_size"),
    "text_decoder.num_attention_heads": ("text_config", "num_attention_heads"),
    "text_decoder.max_position_embeddings": ("text_config", "max_position_embeddings"),
}
ARCH = "the architecture comes from init_from_hf_path's config.json"


def _get(obj, dotted: str):
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def static_items(cfg, data_cfg, hf_config: dict | None) -> list[tuple[str, str]]:
    """(setting, reason) for the flags of a TrainConfig (its `ignored_flags`, resolved before), its
    model.json and fsdp2 yaml, the data.json, and the HF config.json (dict, or None when unreadable)."""
    items = [(f, FLAG_REASONS.get(f, MEGATRON)) for f in cfg.ignored_flags]
    if cfg.init_model_with_meta_device:
        items.append(("--init-model-with-meta-device", FLAG_REASONS["--init-model-with-meta-device"]))
    if cfg.recompute_granularity and cfg.recompute_method == "uniform" and cfg.recompute_num_layers != 1:
        items.append((f"--recompute-num-layers {cfg.recompute_num_layers}",
                      "--recompute-method uniform recomputes every block on its own, as Megatron's uniform with 1"))
    m = cfg.model
    for key, names in MODEL_IDS.items():
        if _get(m, key) not in names:
            items.append((f"model.json {key}={_get(m, key)}", f"the model class follows config.json: {ARCH}"))
    if m.image_encoder.vision_projector.num_layers not in (None, 1):
        items.append((f"model.json image_encoder.vision_projector.num_layers={m.image_encoder.vision_projector.num_layers}",
                      ARCH))
    for key, (section, name) in SIZES.items():
        value = _get(m, key)
        truth = (hf_config or {}).get(section, {}).get(name)
        if value is not None and truth is not None and value != truth:
            items.append((f"model.json {key}={value} (config.json: {truth})", ARCH))
    if m.text_decoder.activation_offload and cfg.recompute_granularity == "full" and cfg.recompute_method == "uniform":
        items.append(("model.json text_decoder.activation_offload",
                      "under --recompute-granularity full every decoder block is recomputed and keeps only its input"))
    items += [(f"model.json patch.{k}", "MindSpeed-MM monkey-patch switches") for k in sorted(m.patch)]
    if cfg.fsdp2.align_fsdp_param_groups:
        items.append(("fsdp2 align_fsdp_param_groups", "mmtune shards one FSDP group per block; the grouping is for Ascend"))
    if data_cfg is not None:
        items += _data_items(data_cfg)
    return items


def _data_items(d) -> list[tuple[str, str]]:
    p, dl = d.preprocess, d.dataloader_param
    items = []
    if not p.use_fast_tokenizer:
        items.append(("data.json preprocess_parameters.use_fast_tokenizer=false",
                      "mmtune always uses the fast tokenizer, tokenizer.json"))
    if dl.dataloader_mode != "sampler":
        items.append((f"data.json dataloader_param.dataloader_mode={dl.dataloader_mode}",
                      "mmtune's loader always takes batches from its sampler"))
    if dl.sampler_type not in SAMPLERS:
        items.append((f"data.json dataloader_param.sampler_type={dl.sampler_type}",
                      "mmtune's sampler is always distributed, seeded and resumable; `shuffle` picks the order"))
    if not dl.drop_last:
        items.append(("data.json dataloader_param.drop_last=false",
                      "mmtune's sampler gives every rank whole batches and drops the remainder of an epoch"))
    c = dl.collate_param
    if c.model_name not in (None, "glm4v_moe", "glm4v"):
        items.append((f"data.json dataloader_param.collate_param.model_name={c.model_name}",
                      "the collator follows the model (config.json's model_type)"))
    if not c.ignore_pad_token_for_loss:
        items.append(("data.json dataloader_param.collate_param.ignore_pad_token_for_loss=false",
                      "pad tokens never count in mmtune's loss"))
    return items


def runtime_items(cfg, *, device_type: str, load_kind: str | None, flash: bool) -> list[tuple[str, str]]:
    """What the device or the --load source leaves without effect in this run."""
    items = []
    if device_type != "cuda":
        if cfg.bf16:
            items.append(("--bf16", "the CPU trains in fp32"))
        if flash:
            items.append(("flash attention: --use-flash-attn / attn_implementation flash_attention_*",
                          "it needs a CUDA GPU and bf16/fp16; SDPA runs"))
        if cfg.model.text_decoder.activation_offload:
            items.append(("model.json text_decoder.activation_offload", "the activations are in host memory already"))
    elif flash:
        import torch

        if cfg.param_dtype("cuda") == torch.float32 or torch.cuda.get_device_capability() < (8, 0):
            items.append(("flash attention: --use-flash-attn / attn_implementation flash_attention_*",
                          "it needs bf16/fp16 parameters (--bf16 or the fsdp2 yaml) and an SM80+ GPU; SDPA runs"))
    if load_kind != "training":
        for flag, on in (("--no-load-optim", cfg.no_load_optim), ("--no-load-rng", cfg.no_load_rng)):
            if on:
                items.append((flag, "--load is not a training checkpoint, so it has no optimizer or RNG state to skip"))
    return items


def format_line(items: Iterable[tuple[str, str]], prog: str = "mmtune train") -> str | None:
    """The ONE line: settings grouped by reason, in first-seen order; None when there is nothing to say."""
    groups: dict[str, list[str]] = {}
    for name, reason in items:
        if name not in groups.setdefault(reason, []):
            groups[reason].append(name)
    if not groups:
        return None
    return f"{prog}: accepted for compatibility, no effect here: " + "; ".join(
        f"{', '.join(names)} ({reason})" for reason, names in groups.items())
