"""`mmtune train`'s configuration surface: flags, --config YAML, model.json, fsdp2 yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmtune.train.compat import format_line
from mmtune.train.args import (
    IGNORED_OPTIONS,
    IGNORED_SWITCHES,
    Fsdp2Config,
    ModelJsonConfig,
    build_parser,
    parse_train_args,
    supported_flags,
)

# The recipe's config files verbatim (docs/RECIPE.md; tests/test_recipe_files.py checks them).
RECIPE_DIR = Path(__file__).parent / "recipe"

PINNED_FLAGS = [
    "--adam-beta1", "--adam-beta2", "--adam-eps", "--async-save", "--bf16", "--clip-grad", "--config",
    "--context-parallel-algo", "--context-parallel-size", "--distributed-backend", "--distributed-timeout-minutes",
    "--exit-interval", "--expert-model-parallel-size", "--fp16", "--fsdp2-config-path", "--global-batch-size",
    "--init-model-with-meta-device", "--keep-latest-checkpoints", "--load", "--log-interval", "--log-tps",
    "--lora-alpha", "--lora-dropout", "--lora-load", "--lora-r", "--lora-target-modules", "--lr", "--lr-decay-iters",
    "--lr-decay-style", "--lr-warmup-fraction", "--lr-warmup-iters", "--max-nonfinite-steps", "--metrics-file",
    "--micro-batch-size", "--min-lr", "--mm-data", "--mm-model", "--mm-tool", "--moe-router-bias-update-rate",
    "--no-auto-resume", "--no-load-optim", "--no-load-rng", "--no-save-optim", "--no-save-rng", "--num-threads",
    "--num-workers",
    "--pipeline-model-parallel-size",
    "--recompute-granularity", "--recompute-method", "--recompute-num-layers", "--save", "--save-interval",
    "--seed", "--seq-length", "--tensor-model-parallel-size", "--train-iters", "--use-flash-attn",
    "--use-torch-compile", "--use-torch-fsdp2", "--weight-decay",
]


@pytest.fixture
def recipe(tmp_path):
    """The recipe's three config files, unchanged, in a temp dir."""
    for name in ("data_106B.json", "model_106B.json", "fsdp2_config.yaml"):
        (tmp_path / name).write_text((RECIPE_DIR / name).read_text())
    return tmp_path


def base(recipe, *extra):
    return ["--mm-data", str(recipe / "data_106B.json"), "--mm-model", str(recipe / "model_106B.json"),
            "--train-iters", "100", "--lr", "1e-5", *extra]


def test_cli_surface_is_pinned():
    assert supported_flags() == PINNED_FLAGS
    # the Megatron internals the recipe's launch script passes are accepted (and ignored)
    for flag in ("--use-mcore-models", "--tokenizer-type", "--make-vocab-size-divisible-by", "--normalization",
                 "--use-fused-rmsnorm", "--swiglu", "--no-masked-softmax-fusion", "--use-distributed-optimizer",
                 "--reuse-fp32-param", "--variable-seq-lengths", "--ckpt-format", "--vocab-size", "--num-layers",
                 "--untie-embeddings-and-output-weights", "--no-gradient-accumulation-fusion", "--hidden-size",
                 "--use-fused-rotary-pos-emb", "--optimizer-selection", "--use-cpu-initialization"):
        assert flag in IGNORED_SWITCHES + IGNORED_OPTIONS
    # --help explains every option (the compatibility flags in one paragraph)
    parser = build_parser()
    text = " ".join(parser.format_help().split())
    for act in parser._actions:
        flag = act.option_strings[0]
        if flag in IGNORED_SWITCHES + IGNORED_OPTIONS:
            assert f" {flag} " in text or f" {flag}." in text, flag
        else:
            assert act.help, act.option_strings


def test_recipe_launch_flags_parse(recipe):
    """The recipe's GPT_ARGS / OUTPUT_ARGS (finetune_glm4_5v_106B.sh) with mmtune's two json files."""
    argv = base(recipe, "--use-mcore-models", "--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size",
                "1", "--context-parallel-size", "1", "--context-parallel-algo", "ulysses_cp_algo",
                "--micro-batch-size", "1", "--global-batch-size", "4", "--tokenizer-type", "NullTokenizer",
                "--vocab-size", "152064", "--seq-length", "1024", "--make-vocab-size-divisible-by", "1",
                "--normalization", "RMSNorm", "--use-fused-rmsnorm", "--swiglu", "--use-fused-swiglu",
                "--no-masked-softmax-fusion", "--lr-decay-style", "cosine", "--weight-decay", "0",
                "--lr-warmup-fraction", "0.1", "--clip-grad", "0.0", "--adam-beta1", "0.9", "--adam-beta2", "0.999",
                "--no-gradient-accumulation-fusion", "--seed", "42", "--load", "ckpt/mm_path/GLM-4.5V",
                "--use-flash-attn", "--no-load-optim", "--no-load-rng", "--no-save-optim", "--no-save-rng",
                "--num-workers", "8", "--use-torch-fsdp2", "--untie-embeddings-and-output-weights",
                "--ckpt-format", "torch_dcp", "--fsdp2-config-path", str(recipe / "fsdp2_config.yaml"),
                "--optimizer-selection", "fused_torch_adamw", "--use-cpu-initialization",
                "--init-model-with-meta-device", "--log-tps", "--log-interval", "1", "--save-interval", "10000",
                "--eval-interval", "10000", "--eval-iters", "5000", "--save", "save_dir",
                "--distributed-backend", "nccl")
    cfg = parse_train_args(argv, world_size=2)
    assert cfg.grad_accum_steps == 2 and cfg.dp_size == 2
    assert cfg.lr_warmup_iters == 10 and cfg.lr_decay_style == "cosine" and cfg.seed == 42
    assert cfg.model.loss_cfg.loss_type == "per_token_loss" and cfg.model.freeze_vision_encoder
    assert cfg.fsdp2.param_dtype == "bf16" and cfg.fsdp2.reshard_after_forward
    msg = format_line(cfg.no_effect)  # `mmtune train` prints this ONE line (rank 0) when it starts
    assert "\n" not in msg and msg.startswith("mmtune train: accepted for compatibility, no effect here: ")
    for flag in ("--use-mcore-models", "--tokenizer-type", "--optimizer-selection", "--eval-iters", "--use-torch-fsdp2",
                 "--init-model-with-meta-device", "model.json patch.clip_grad_async"):
        assert flag in msg
    assert "--seed" not in msg and "--load " not in msg and "--use-flash-attn" not in msg
    assert cfg.ignored_flags and "--swiglu" in cfg.ignored_flags


def test_seed_model_json_and_fsdp2_yaml(recipe):
    m = ModelJsonConfig.load(recipe / "model_106B.json")
    assert sorted(m.patch) == ["clip_grad_async", "scale_grad"]  # accepted; named in the no-effect line
    assert m.init_from_hf_path == "./ckpt/hf_path/GLM-4.5V"
    assert (m.freeze_vision_encoder, m.freeze_vision_projector, m.freeze_text_decoder) == (True, True, False)
    assert m.grouped_gemm and m.attn_implementation == "sdpa" and not m.text_decoder.activation_offload
    assert (m.loss_cfg.compute_mode, m.loss_cfg.chunk_size, m.loss_cfg.loss_type) == ("default", 1024, "per_token_loss")
    f = Fsdp2Config.load(recipe / "fsdp2_config.yaml")
    import torch

    assert f.sharding_size == "auto" and f.param_torch_dtype == torch.bfloat16 and f.reduce_torch_dtype == torch.float32
    assert (f.num_to_forward_prefetch, f.num_to_backward_prefetch, f.offload_to_cpu) == (0, 0, False)


def test_model_json_loss_cfg_and_errors(tmp_path):
    p = tmp_path / "model.json"
    p.write_text(json.dumps({"loss_cfg": {"compute_mode": "chunk", "chunk_size": 256, "loss_type": "square_loss",
                                          "router_aux_loss_coef": 0.001}}))
    m = ModelJsonConfig.load(p)
    assert m.loss_cfg.chunk_size == 256 and m.loss_cfg.router_aux_loss_coef == 0.001
    p.write_text(json.dumps({"loss_cfg": {"loss_typ": "default"}}))
    with pytest.raises(ValueError, match=r"model.json.*'loss_cfg.loss_typ'.*did you mean 'loss_type'"):
        ModelJsonConfig.load(p)
    p.write_text(json.dumps({"text_decoder": {"freez": True}}))
    with pytest.raises(ValueError, match=r"'text_decoder.freez'.*'freeze'"):
        ModelJsonConfig.load(p)
    p.write_text(json.dumps({"loss_cfg": {"loss_type": "mean"}}))
    with pytest.raises(ValueError, match=r"loss_cfg.loss_type"):
        ModelJsonConfig.load(p)
    p.write_text(json.dumps({"text_decoder": {"attn_implementation": "flash"}}))
    with pytest.raises(ValueError, match=r"attn_implementation 'flash'"):
        ModelJsonConfig.load(p)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        ModelJsonConfig.load(tmp_path / "nope.json")
    y = tmp_path / "fsdp2.yaml"
    y.write_text("reshard_after_forward: true\noffload_cpu: true\n")
    with pytest.raises(ValueError, match=r"fsdp2.yaml.*'offload_cpu'.*'offload_to_cpu'"):
        Fsdp2Config.load(y)
    y.write_text("param_dtype: int8\n")
    with pytest.raises(ValueError, match=r"param_dtype 'int8'"):
        Fsdp2Config.load(y)


def test_unknown_flag_and_yaml_key_are_named(recipe):
    with pytest.raises(ValueError, match=r"'--micro-batch-sise'.*did you mean '--micro-batch-size'"):
        parse_train_args(base(recipe, "--micro-batch-sise", "2"))
    with pytest.raises(ValueError, match=r"'--frobnicate'"):
        parse_train_args(base(recipe, "--frobnicate"))
    cfg = recipe / "train.yaml"
    cfg.write_text("lr: 2.0e-5\nglobal_batch_sise: 8\n")
    with pytest.raises(ValueError, match=r"train.yaml: unknown key 'global_batch_sise'.*'global-batch-size'"):
        parse_train_args(base(recipe, "--config", str(cfg)))


def test_yaml_config_and_precedence(recipe):
    cfg = recipe / "train.yaml"
    cfg.write_text(yaml.safe_dump({"lr": "3e-5", "micro-batch-size": 2, "global_batch_size": 8, "log_tps": True,
                                   "lr_decay_style": "cosine", "use_mcore_models": True}))
    argv = ["--config", str(cfg), "--mm-data", str(recipe / "data_106B.json"), "--mm-model",
            str(recipe / "model_106B.json"), "--train-iters", "10", "--micro-batch-size", "4"]
    c = parse_train_args(argv, world_size=1)
    assert c.lr == 3e-5 and c.log_tps and c.lr_decay_style == "cosine"
    assert c.micro_batch_size == 4 and c.grad_accum_steps == 2  # the flag wins over the yaml
    assert "--use-mcore-models" in format_line(c.no_effect)


def test_batch_and_parallel_errors(recipe):
    with pytest.raises(ValueError, match=r"--global-batch-size 6.*--micro-batch-size 2.*data-parallel size 2"):
        parse_train_args(base(recipe, "--micro-batch-size", "2", "--global-batch-size", "6"), world_size=2)
    assert parse_train_args(base(recipe, "--micro-batch-size", "2"), world_size=2).global_batch_size == 4
    with pytest.raises(ValueError, match=r"--tensor-model-parallel-size 2 is not supported.*FSDP2"):
        parse_train_args(base(recipe, "--tensor-model-parallel-size", "2"))
    with pytest.raises(ValueError, match=r"--context-parallel-size 4 must divide the world size 1"):
        parse_train_args(base(recipe, "--context-parallel-size", "4"))
    with pytest.raises(ValueError, match=r"--context-parallel-algo 'megatron_cp_algo' is not supported.*ulysses"):
        parse_train_args(base(recipe, "--context-parallel-algo", "megatron_cp_algo"))
    with pytest.raises(ValueError, match=r"--expert-model-parallel-size 3 must divide .* = 4"):
        parse_train_args(base(recipe, "--expert-model-parallel-size", "3"), world_size=4)
    # context parallel: the cp ranks of a group read one batch, so dp = world / cp sets the global batch
    cfg = parse_train_args(base(recipe, "--context-parallel-size", "2", "--expert-model-parallel-size", "4"),
                           world_size=4)
    assert (cfg.dp_size, cfg.global_batch_size, cfg.grad_accum_steps) == (2, 2, 1)
    assert (cfg.parallel_dims.cp, cfg.parallel_dims.ep, cfg.parallel_dims.efsdp) == (2, 4, 1)
    with pytest.raises(ValueError, match=r"--fp16"):
        parse_train_args(base(recipe, "--fp16"))
    with pytest.raises(ValueError, match=r"not both"):
        parse_train_args(base(recipe, "--lr-warmup-fraction", "0.1", "--lr-warmup-iters", "5"))
    with pytest.raises(ValueError, match=r"--lr-decay-style: invalid choice"):
        parse_train_args(base(recipe, "--lr-decay-style", "step"))
    with pytest.raises(ValueError, match=r"--train-iters is required"):
        parse_train_args(["--mm-data", str(recipe / "data_106B.json"), "--mm-model", str(recipe / "model_106B.json"),
                          "--lr", "1e-5"])
    with pytest.raises(FileNotFoundError, match=r"--mm-data .*missing.json"):
        parse_train_args(base(recipe, "--mm-data", str(recipe / "missing.json")))
    with pytest.raises(ValueError, match=r"selective"):
        parse_train_args(base(recipe, "--recompute-granularity", "selective"))


def test_num_workers_comes_from_data_json_unless_given(recipe):
    assert parse_train_args(base(recipe)).num_workers is None  # the loader then takes data.json's
    assert parse_train_args(base(recipe, "--num-workers", "3")).num_workers == 3


def test_derived_values(recipe):
    c = parse_train_args(base(recipe, "--recompute-granularity", "full", "--recompute-method", "block",
                              "--recompute-num-layers", "2", "--save", str(recipe / "run")))
    assert c.metrics_path == recipe / "run" / "metrics.jsonl"
    import torch

    assert c.param_dtype("cpu") == torch.float32
    assert parse_train_args(base(recipe, "--bf16")).param_dtype("cuda") == torch.bfloat16
    assert parse_train_args(base(recipe)).param_dtype("cuda") == torch.float32
    # the loop's own default (tests build LoopSettings directly) is the flag's default
    from mmtune.train.trainer import LoopSettings

    assert LoopSettings(train_iters=1, grad_accum_steps=1).max_nonfinite_steps == c.max_nonfinite_steps == 3


def test_saved_config_reproduces_the_run(recipe, tmp_path):
    argv = base(recipe, "--fsdp2-config-path", str(recipe / "fsdp2_config.yaml"), "--global-batch-size", "4",
                "--lr-decay-style", "cosine", "--lr-warmup-fraction", "0.05", "--save", str(tmp_path / "run"),
                "--use-mcore-models")
    c = parse_train_args(argv, world_size=2)
    path = c.save_to(tmp_path / "run")
    text = path.read_text()
    assert "grad_accum_steps=2" in text and "loss_type: per_token_loss" in text
    again = parse_train_args(["--config", str(path)], world_size=2)
    same = ("micro_batch_size", "global_batch_size", "train_iters", "lr", "lr_decay_style", "lr_warmup_iters",
            "lr_decay_iters", "seed", "save", "model", "fsdp2")
    assert {k: getattr(again, k) for k in same} == {k: getattr(c, k) for k in same}
    assert Path(again.mm_model) == (tmp_path / "run" / "model.json").resolve()
