"""`mmtune train`'s configuration: Megatron-style flags, a YAML `--config`, the recipe's model.json
and fsdp2 yaml, resolved into one typed `TrainConfig`.

The model.json and fsdp2 yaml models are in train/recipe_files.py.

The flags are the MindSpeed-MM launch script's names (docs/RECIPE.md, "Launch flags"), so a recipe script
ports by changing its `torchrun ... pretrain_transformers.py` line to `torchrun ... -m mmtune train`.
Flags that only configure Megatron/Ascend internals (`IGNORED_SWITCHES`, `IGNORED_OPTIONS`) are
accepted; they and every other setting that has no effect (train/compat.py) are reported in ONE line
when training starts; anything else unknown is a ValueError naming it.

Precedence: command line > `--config` YAML > defaults. YAML keys are spelled like the flags, with
`_` or `-` (`micro_batch_size` or `micro-batch-size`); store-true flags take true/false.

Every user error raises ValueError (or FileNotFoundError) naming the flag, key or file.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from mmtune.config_files import read_mapping, suggest
# the model.json / fsdp2 yaml models (LOSS_TYPES re-exported: the one list of loss types)
from mmtune.train.recipe_files import LOSS_TYPES, Fsdp2Config, LossConfig, ModelJsonConfig  # noqa: F401

log = logging.getLogger(__name__)
PROG = "mmtune train"

# Megatron/Ascend flags with no effect in mmtune: store-true switches, then flags taking one value.
# (The architecture comes from the HF config.json; tokenisation from data.json; fusions are the
# model's own choice; the optimizer is always torch AdamW, sharded by FSDP2.)
IGNORED_SWITCHES = (
    "--use-mcore-models", "--use-fused-rmsnorm", "--swiglu", "--use-fused-swiglu",
    "--no-masked-softmax-fusion", "--use-distributed-optimizer", "--reuse-fp32-param",
    "--variable-seq-lengths", "--untie-embeddings-and-output-weights",
    "--no-gradient-accumulation-fusion", "--use-fused-rotary-pos-emb", "--use-cpu-initialization",
    "--sequence-parallel", "--overlap-grad-reduce", "--overlap-param-gather", "--disable-bias-linear",
    "--add-qkv-bias", "--group-query-attention", "--no-rope-fusion", "--no-bias-dropout-fusion",
    "--no-bias-swiglu-fusion", "--use-rotary-position-embeddings", "--moe-grouped-gemm",
    "--use-fused-moe-token-permute-and-unpermute", "--use-ascend-mc2", "--trust-remote-code",
    "--attention-softmax-in-fp32", "--no-shared-storage", "--use-fused-ring-attention-update",
    "--no-load-strict", "--finetune", "--use-dist-ckpt", "--use-fsdp2-checkpoint",
)
IGNORED_OPTIONS = (
    "--tokenizer-type", "--tokenizer-model", "--tokenizer-name-or-path", "--make-vocab-size-divisible-by",
    "--normalization", "--vocab-size", "--num-layers", "--hidden-size", "--ffn-hidden-size",
    "--num-attention-heads", "--num-query-groups", "--max-position-embeddings", "--ckpt-format",
    "--position-embedding-type", "--rotary-base", "--norm-epsilon", "--attention-dropout",
    "--hidden-dropout", "--init-method-std", "--optimizer-selection",
    "--eval-interval", "--eval-iters", "--transformer-impl", "--split", "--data-path",
    "--moe-router-topk", "--num-experts", "--padded-vocab-size",
    "--attention-mask-type", "--virtual-pipeline-model-parallel-size",
)

DEFAULT_SEQ_LENGTH = 4096
CP_ALGOS = ("ulysses_cp_algo",)


# --------------------------------------------------------------------------- flags


class _Formatter(argparse.HelpFormatter):
    """Wraps without breaking flag names at their hyphens."""

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would exit(2); the caller decides what to do
        raise ValueError(f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False, formatter_class=_Formatter,
                usage=f"{PROG} --mm-data DATA.json --mm-model MODEL.json --train-iters N --lr LR [--config TRAIN.yaml] "
                      "[options]",
                description="Finetune a GLM-V model with FSDP2 (one process, or torchrun -m mmtune train): GLM-4.5V / "
                            "GLM-4.6V (glm4v_moe) or GLM-4.1V / GLM-4.6V-Flash (glm4v), as model.json's "
                            "init_from_hf_path config.json says. Flags follow MindSpeed-MM's launch script.")
    a = p.add_argument_group("inputs").add_argument
    a("--mm-data", help="data.json (MindSpeed-MM format): datasets, template, image processor, loader")
    a("--mm-model", help="model.json: init_from_hf_path, freeze flags, attention, loss_cfg")
    a("--mm-tool", help="tools.json: profiling (torch.profiler ranks/steps, CUDA memory snapshot)")
    a("--fsdp2-config-path", help="fsdp2 yaml: sharding_size, reshard_after_forward, dtypes, prefetch, offload")
    a("--config", help="YAML with any of these settings (keys spelled like the flags, _ or -); flags win")

    a = p.add_argument_group("batch and schedule").add_argument
    a("--micro-batch-size", type=int, default=1, help="samples (or packed rows) per rank per forward (default 1)")
    a("--global-batch-size", type=int,
      help="samples per optimizer step over all ranks; grad-accum = GBS / (MBS * data-parallel size), must "
           "divide (default MBS * data-parallel size: no accumulation)")
    a("--seq-length", type=int, default=DEFAULT_SEQ_LENGTH,
      help="maximum tokens per sample (packing off) or per packed row (packing on); longer samples are dropped or "
           "cut as data.json's too_long says (default %(default)s)")
    a("--train-iters", type=int, help="optimizer steps to train (required)")
    a("--lr", type=float, help="peak learning rate (required)")
    a("--min-lr", type=float, default=0.0, help="learning rate at the end of decay (default 0)")
    a("--lr-decay-style", choices=["cosine", "linear", "constant"], default="linear",
      help="decay after warmup, Megatron semantics (default linear)")
    a("--lr-decay-iters", type=int, help="steps over which lr decays to --min-lr (default --train-iters)")
    a("--lr-warmup-fraction", type=float, help="linear warmup over this fraction of the decay steps")
    a("--lr-warmup-iters", type=int, default=0, help="linear warmup steps (exclusive with --lr-warmup-fraction)")
    a("--weight-decay", type=float, default=0.01, help="AdamW weight decay; not applied to norms/biases (default 0.01)")
    a("--clip-grad", type=float, default=1.0, help="clip the global grad norm to this; 0 = no clipping (default 1.0)")
    a("--adam-beta1", type=float, default=0.9, help="AdamW beta1 (default 0.9)")
    a("--adam-beta2", type=float, default=0.999, help="AdamW beta2 (default 0.999)")
    a("--adam-eps", type=float, default=1e-8, help="AdamW epsilon (default 1e-8)")
    a("--seed", type=int, default=1234, help="random seed (default 1234, Megatron's)")
    a("--max-nonfinite-steps", type=int, default=3,
      help="a step with a non-finite loss or grad norm is skipped; this many in a row stop the run (default 3)")

    a = p.add_argument_group("checkpoints and logging").add_argument
    a("--load", help="a checkpoint dir to resume (<save> layout) or a converted weights-only DCP to start from")
    a("--save", help="run dir: iter_XXXXXXX/ checkpoints, latest_checkpointed_iteration.txt, metrics.jsonl")
    a("--save-interval", type=int, help="save every N steps (and always at the end when --save is set)")
    a("--exit-interval", type=int, help="stop (after saving) when the step count is a multiple of N")
    a("--log-interval", type=int, default=100, help="log every N steps (default 100, Megatron's)")
    a("--metrics-file", help="JSON-lines metrics file (default <save>/metrics.jsonl)")
    a("--log-tps", action="store_true",
      help="show tokens/s and samples/s in the console log lines (metrics.jsonl always has them)")
    for what in ("optim", "rng"):
        a(f"--no-load-{what}", action="store_true", help=f"do not restore the {what} state from --load")
        a(f"--no-save-{what}", action="store_true", help=f"do not write the {what} state into checkpoints")
    a("--async-save", action="store_true",
      help="write checkpoints in the background: training waits only for the copy into a CPU staging buffer; "
           "latest_checkpointed_iteration.txt moves once the write is complete on every rank")
    a("--keep-latest-checkpoints", type=int, default=0, metavar="K",
      help="after each complete save, delete all but the newest K iter_* dirs (never the latest one); "
           "0 keeps all (default)")
    a("--no-auto-resume", action="store_true",
      help="start from --load even when --save already holds a checkpoint (by default a run whose --save has "
           "one resumes from it: what makes torchrun --max-restarts continue where it was)")

    a = p.add_argument_group("model and parallelism").add_argument
    a("--init-model-with-meta-device", action="store_true",
      help="accepted for the recipe; no effect: mmtune always builds the model on the meta device, shards it, "
           "then loads each rank's weights")
    a("--use-flash-attn", action="store_true",
      help="flash attention (torch's varlen kernel, one call over the packed samples of a batch) for the decoder "
           "and the vision tower, whatever model.json's attn_implementation says; needs CUDA and bf16 (on the CPU "
           "SDPA runs)")
    a("--bf16", action="store_true", help="bf16 parameters on CUDA (FSDP2 mixed precision); CPU trains in fp32")
    a("--fp16", action="store_true", help="not supported (needs loss scaling): use --bf16")
    a("--use-torch-fsdp2", action="store_true", help="accepted for the recipe: mmtune always shards with FSDP2")
    a("--distributed-backend", choices=["auto", "nccl", "gloo"], default="auto",
      help="process-group backend (default auto: on CUDA nccl for GPU tensors plus gloo for CPU tensors, which "
           "offload_to_cpu needs; gloo on the CPU)")
    a("--distributed-timeout-minutes", type=int, default=10, help="collective timeout (default 10)")
    a("--num-workers", type=int,
      help="data-loader worker processes per rank (default: data.json dataloader_param.num_workers when given, "
           "else chosen from the rank's cores: 0 on one core, else one per 4 cores, 1-4; printed at start)")
    a("--num-threads", type=int,
      help="intra-op threads per rank (default: OMP_NUM_THREADS when set, as torchrun sets it, else the rank's "
           "cores minus its loader workers; printed at start)")
    a("--use-torch-compile", action="store_true",
      help="torch.compile each decoder layer and vision block (after activation checkpointing, before FSDP2; "
           "dynamic token lengths, compiled once per block kind); the first step includes the compile time")
    a("--recompute-granularity", choices=["full", "selective"],
      help="activation checkpointing per transformer block: full (selective is not supported)")
    a("--recompute-method", choices=["uniform", "block"], default="uniform",
      help="uniform: every block; block: the first --recompute-num-layers blocks of each tower")
    a("--recompute-num-layers", type=int, default=1, help="blocks checkpointed with --recompute-method block")
    a("--context-parallel-size", type=int, default=1,
      help="ranks that split one sequence (Ulysses context parallelism); must divide the world size and the "
           "attention heads; data-parallel size = world / CP (default 1)")
    a("--context-parallel-algo", default=CP_ALGOS[0], help=f"context-parallel algorithm: {' | '.join(CP_ALGOS)} "
      f"(default {CP_ALGOS[0]})")
    a("--expert-model-parallel-size", type=int, default=1,
      help="ranks that split the routed experts (each owns n_routed_experts/EP whole experts; tokens travel by "
           "all-to-all); taken from the data/context ranks, must divide them and the experts (default 1)")
    a("--moe-router-bias-update-rate", type=float, default=0.0,
      help="aux-loss-free load balancing: after each step every router's e_score_correction_bias moves by this "
           "rate towards balance (+rate for experts below the mean load, -rate above); 0 = off, the finetuning "
           "default (DeepSeek-V3 pretrained with 1e-3)")
    for name in ("tensor-model", "pipeline-model"):
        a(f"--{name}-parallel-size", type=int, default=1, help="must be 1 (not supported; use FSDP2, CP and EP)")

    a = p.add_argument_group(
        "LoRA", "Low-rank adapters instead of full finetuning: the base weights are frozen (and kept in the compute "
        "dtype), only the adapters train; checkpoints hold only the adapters. `mmtune convert dcp-to-hf` merges "
        "them into a full HF model, or writes a PEFT adapter with --adapter-only.").add_argument
    a("--lora-r", type=int, help="adapter rank; turns LoRA on (default: off, full finetuning)")
    a("--lora-alpha", type=float, help="the update is scaled by alpha / r (default 32, or the --lora-load adapter's)")
    a("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    a("--lora-target-modules", nargs="+",
      help="modules that get adapters, by name as in the model: q_proj k_proj v_proj o_proj gate_proj up_proj "
           "down_proj shared_experts experts (the routed experts, one adapter per expert) and the vision tower's "
           "qkv proj (when model.json trains it), or all-linear (default: all-linear; the router gate never)")
    a("--lora-load", help="start from the adapters of a LoRA checkpoint (a save dir or iter_XXXXXXX) at step 0 "
                          "with a fresh optimizer; its rank, alpha and targets apply unless given")

    g = p.add_argument_group(
        "Megatron/Ascend flags accepted for compatibility",
        "These configure Megatron/Ascend internals and have NO effect in mmtune (one warning lists those given): "
        + " ".join(IGNORED_SWITCHES) + " (switches); " + " ".join(f"{f} X" for f in IGNORED_OPTIONS) + ".")
    for flag in IGNORED_SWITCHES:
        g.add_argument(flag, action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    for flag in IGNORED_OPTIONS:
        g.add_argument(flag, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return p


def supported_flags() -> list[str]:
    """Every flag mmtune acts on (the pinned CLI surface), sorted."""
    ignored = set(IGNORED_SWITCHES) | set(IGNORED_OPTIONS) | {"-h", "--help"}
    flags = {s for act in build_parser()._actions for s in act.option_strings}
    return sorted(flags - ignored)


# --------------------------------------------------------------------------- TrainConfig


class TrainConfig(BaseModel):
    """The resolved `mmtune train` configuration (flags + model.json + fsdp2 yaml + world size)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mm_data: str
    mm_model: str
    mm_tool: str | None = None
    fsdp2_config_path: str | None = None
    micro_batch_size: int = Field(gt=0)
    global_batch_size: int = Field(gt=0)
    seq_length: int = Field(DEFAULT_SEQ_LENGTH, gt=0)
    train_iters: int = Field(gt=0)
    lr: float = Field(gt=0)
    min_lr: float = Field(ge=0)
    lr_decay_style: Literal["cosine", "linear", "constant"]
    lr_decay_iters: int = Field(gt=0)
    lr_warmup_iters: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    clip_grad: float = Field(ge=0)
    adam_beta1: float = Field(ge=0, lt=1)
    adam_beta2: float = Field(ge=0, lt=1)
    adam_eps: float = Field(gt=0)
    seed: int
    max_nonfinite_steps: int = Field(gt=0)
    load: str | None = None
    save: str | None = None
    save_interval: int | None = Field(None, gt=0)
    exit_interval: int | None = Field(None, gt=0)
    log_interval: int = Field(gt=0)
    metrics_file: str | None = None
    log_tps: bool = False
    no_load_optim: bool = False
    no_load_rng: bool = False
    no_save_optim: bool = False
    no_save_rng: bool = False
    async_save: bool = False
    keep_latest_checkpoints: int = Field(0, ge=0)
    no_auto_resume: bool = False
    init_model_with_meta_device: bool = False
    use_flash_attn: bool = False
    bf16: bool = False
    distributed_backend: Literal["auto", "nccl", "gloo"] = "auto"
    distributed_timeout_minutes: int = Field(gt=0)
    num_workers: int | None = Field(None, ge=0)  # None: data.json's, else chosen from the cores (train/cores.py)
    num_threads: int | None = Field(None, gt=0)  # None: OMP_NUM_THREADS, else chosen from the cores
    use_torch_compile: bool = False
    recompute_granularity: Literal["full"] | None = None
    recompute_method: Literal["uniform", "block"] = "uniform"
    recompute_num_layers: int = Field(ge=0)
    context_parallel_size: int = Field(1, gt=0)
    context_parallel_algo: Literal["ulysses_cp_algo"] = "ulysses_cp_algo"
    expert_model_parallel_size: int = Field(1, gt=0)
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    lora_target_modules: tuple[str, ...] | None = None
    lora_load: str | None = None
    moe_router_bias_update_rate: float = Field(0.0, ge=0)
    world_size: int = Field(1, gt=0)
    model: ModelJsonConfig
    fsdp2: Fsdp2Config
    ignored_flags: tuple[str, ...] = ()
    no_effect: tuple[tuple[str, str], ...] = ()  # (setting, reason) of train/compat.py, found at parse time

    # derived -------------------------------------------------------------
    @property
    def parallel_dims(self):
        """The parallel layout (sizes only; the meshes are built by distributed.init_distributed)."""
        from mmtune.distributed.parallel_dims import ParallelDims

        return ParallelDims.from_config(self.world_size, self.fsdp2.sharding_size, cp=self.context_parallel_size,
                                        ep=self.expert_model_parallel_size)

    def lora_config(self, saved: dict | None = None):
        """The LoRA settings (train/lora.LoRAConfig), or None for full finetuning. `saved`: the metadata of
        the adapter being continued (--lora-load, or --load of a LoRA checkpoint): flags left out take its
        values; flags given must agree with it (ValueError naming the flag)."""
        from mmtune.train.lora import DEFAULT_ALPHA, DEFAULT_TARGETS, LoRAConfig

        given = {"r": self.lora_r, "alpha": self.lora_alpha, "dropout": self.lora_dropout,
                 "targets": self.lora_target_modules}
        if saved is None:
            if self.lora_r is None:
                return None
            return LoRAConfig(r=self.lora_r, alpha=DEFAULT_ALPHA if self.lora_alpha is None else self.lora_alpha,
                              dropout=self.lora_dropout or 0.0, targets=tuple(self.lora_target_modules or DEFAULT_TARGETS))
        for key in ("r", "alpha", "targets"):
            want = tuple(saved[key]) if key == "targets" else saved[key]
            if given[key] is not None and (tuple(given[key]) if key == "targets" else given[key]) != want:
                flag = "--lora-target-modules" if key == "targets" else f"--lora-{key}"
                raise ValueError(f"{flag} {given[key]} disagrees with the adapter being continued ({flag} {want}); "
                                 "leave it out to take the adapter's")
        return LoRAConfig(r=int(saved["r"]), alpha=float(saved["alpha"]), targets=tuple(saved["targets"]),
                          dropout=float(saved["dropout"] if self.lora_dropout is None else self.lora_dropout))

    @property
    def dp_size(self) -> int:
        """Data-parallel size: world / context-parallel size (the cp ranks of a group read one batch)."""
        return self.world_size // self.context_parallel_size

    @property
    def grad_accum_steps(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)

    @property
    def loss(self) -> LossConfig:
        return self.model.loss_cfg

    @property
    def metrics_path(self) -> Path | None:
        if self.metrics_file:
            return Path(self.metrics_file)
        return Path(self.save) / "metrics.jsonl" if self.save else None

    def param_dtype(self, device_type: str):
        """Parameter dtype for FSDP2 mixed precision: fp32 on CPU; on CUDA the fsdp2 yaml's param_dtype
        when a yaml was given, else bf16 with --bf16, else fp32."""
        import torch

        if device_type != "cuda":
            return torch.float32
        if self.fsdp2_config_path:
            return self.fsdp2.param_torch_dtype
        return torch.bfloat16 if self.bf16 else torch.float32

    # output --------------------------------------------------------------
    def flag_values(self) -> dict[str, Any]:
        """The settings as `--config` YAML keys (flag names with `_`); None values omitted."""
        skip = {"world_size", "model", "fsdp2", "ignored_flags", "no_effect"}
        return {k: v for k, v in self.model_dump(exclude=skip).items() if v is not None}

    def to_yaml(self) -> str:
        """A `--config` YAML that reproduces this run (on the same world size), plus the derived values
        and the resolved model.json / fsdp2 yaml as comments."""
        head = (f"# mmtune train resolved config: world_size={self.world_size} dp={self.dp_size} "
                f"grad_accum_steps={self.grad_accum_steps}\n")
        body = yaml.safe_dump(self.flag_values(), sort_keys=False)
        resolved = yaml.safe_dump({"model": self.model.model_dump(), "fsdp2": self.fsdp2.model_dump()}, sort_keys=False)
        return head + body + "".join(f"# {line}\n" for line in resolved.splitlines())

    def save_to(self, run_dir: str | os.PathLike) -> Path:
        """Write run_dir/train_config.yaml (atomically) plus copies of data.json / model.json / fsdp2 yaml
        (the yaml points at the copies, so `mmtune train --config run_dir/train_config.yaml` reruns)."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        values = self.flag_values()
        for key, name in (("mm_data", "data.json"), ("mm_model", "model.json"), ("fsdp2_config_path", "fsdp2.yaml"),
                          ("mm_tool", "tools.json")):
            if values.get(key) and Path(values[key]).is_file():
                dst = run_dir / name
                if Path(values[key]).resolve() != dst.resolve():
                    shutil.copyfile(values[key], dst)
                values[key] = str(dst.resolve())
        cfg = self.model_copy(update={k: values[k] for k in ("mm_data", "mm_model", "fsdp2_config_path", "mm_tool")
                                      if k in values})
        out = run_dir / "train_config.yaml"
        tmp = out.with_suffix(".yaml.tmp")
        tmp.write_text(cfg.to_yaml())
        os.replace(tmp, out)
        return out


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> tuple[dict[str, Any], list[str]]:
    """--config YAML -> (argparse defaults by dest, ignored flags named in it)."""
    data = read_mapping(path, "yaml")
    by_flag = parser._option_string_actions
    known = [s for s in by_flag if s.startswith("--")]
    defaults, ignored = {}, []
    for key, value in data.items():
        flag = "--" + str(key).replace("_", "-")
        if flag not in by_flag or flag in ("--help", "--config"):
            raise ValueError(f"{path}: unknown key {key!r}" + suggest(flag, known).replace("'--", "'"))
        if flag in IGNORED_SWITCHES or flag in IGNORED_OPTIONS:
            ignored.append(flag)
            continue
        defaults[by_flag[flag].dest] = value
    return defaults, ignored


def parse_train_args(argv: list[str], world_size: int | None = None) -> TrainConfig:
    """Parse `mmtune train`'s flags (plus --config YAML, model.json, fsdp2 yaml) into a TrainConfig.

    world_size: the number of ranks (default: $WORLD_SIZE as torchrun sets it, else 1); it sets the
    data-parallel size that --global-batch-size is divided by. Raises ValueError / FileNotFoundError
    naming the flag, key or file on any user error; `--help` prints and raises SystemExit(0).
    """
    parser = build_parser()
    argv = list(argv)
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    config_path = pre.parse_known_args(argv)[0].config
    ignored: list[str] = []
    if config_path:
        defaults, ignored = _yaml_defaults(parser, config_path)
        parser.set_defaults(**defaults)

    ns, extra = parser.parse_known_args(argv)
    if extra:
        known = [s for s in parser._option_string_actions if s.startswith("--")]
        bad = [x for x in extra if x.startswith("-")] or extra
        raise ValueError(f"{PROG}: unknown argument {bad[0]!r}" + suggest(bad[0].split("=")[0], known)
                         + (f" (and {len(bad) - 1} more: {' '.join(bad[1:])})" if len(bad) > 1 else ""))
    args = vars(ns)
    dest_to_flag = {act.dest: act.option_strings[0] for act in parser._actions if act.option_strings}
    for dest in list(args):
        flag = dest_to_flag.get(dest)
        if flag in IGNORED_SWITCHES or flag in IGNORED_OPTIONS:
            args.pop(dest)
            ignored.append(flag)
    return _resolve(args, world_size, ignored)


def _resolve(args: dict[str, Any], world_size: int | None, ignored: list[str]) -> TrainConfig:
    for flag in ("mm_data", "mm_model", "train_iters", "lr"):
        if args.get(flag) is None:
            raise ValueError(f"{PROG}: --{flag.replace('_', '-')} is required (on the command line or in --config)")
    for name in ("tensor_model", "pipeline_model"):
        size = args.pop(f"{name}_parallel_size")
        if size != 1:
            raise ValueError(f"{PROG}: --{name.replace('_', '-')}-parallel-size {size} is not supported; set it to 1 "
                             "and scale with FSDP2 data parallelism, --context-parallel-size and "
                             "--expert-model-parallel-size")
    if args["context_parallel_algo"] not in CP_ALGOS:
        raise ValueError(f"{PROG}: --context-parallel-algo {args['context_parallel_algo']!r} is not supported; "
                         f"mmtune implements {' and '.join(CP_ALGOS)} (Ulysses: all-to-all between sequence and "
                         "head sharding around attention)")
    if args.pop("fp16"):
        raise ValueError(f"{PROG}: --fp16 is not supported (fp16 needs loss scaling); use --bf16")
    if args.pop("use_torch_fsdp2"):
        ignored.append("--use-torch-fsdp2")
    args.pop("config")
    if args.get("recompute_granularity") == "selective":
        raise ValueError(f"{PROG}: --recompute-granularity selective is not supported; use full "
                         "(activation checkpointing of whole blocks)")
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    model = ModelJsonConfig.load(args["mm_model"])
    fsdp2 = Fsdp2Config.load(args["fsdp2_config_path"]) if args.get("fsdp2_config_path") else Fsdp2Config()
    from mmtune.distributed.parallel_dims import ParallelDims

    dp = ParallelDims.from_config(world_size, fsdp2.sharding_size, cp=args["context_parallel_size"],
                                  ep=args["expert_model_parallel_size"]).dp
    mbs = args["micro_batch_size"]
    if mbs is None or mbs < 1:
        raise ValueError(f"{PROG}: --micro-batch-size must be >= 1, got {mbs}")
    if args["global_batch_size"] is None:
        args["global_batch_size"] = mbs * dp
    gbs = args["global_batch_size"]
    if gbs % (mbs * dp) != 0 or gbs < mbs * dp:
        raise ValueError(f"{PROG}: --global-batch-size {gbs} must be a positive multiple of --micro-batch-size "
                         f"{mbs} x data-parallel size {dp} (= {mbs * dp}; world {world_size} / context-parallel "
                         f"{args['context_parallel_size']}); grad-accum steps = GBS / (MBS x DP)")
    frac, warm = args.pop("lr_warmup_fraction"), args["lr_warmup_iters"]
    if args["lr_decay_iters"] is None:
        args["lr_decay_iters"] = args["train_iters"]
    if frac is not None:
        if warm:
            raise ValueError(f"{PROG}: give --lr-warmup-fraction or --lr-warmup-iters, not both")
        if not 0.0 <= frac <= 1.0:
            raise ValueError(f"{PROG}: --lr-warmup-fraction must be in [0, 1], got {frac}")
        args["lr_warmup_iters"] = int(frac * args["lr_decay_iters"])  # Megatron: fraction of decay steps
    if args["lr_warmup_iters"] > args["lr_decay_iters"]:
        raise ValueError(f"{PROG}: warmup ({args['lr_warmup_iters']} steps) is longer than the decay "
                         f"({args['lr_decay_iters']} steps); lower --lr-warmup-iters/--lr-warmup-fraction")
    if args["min_lr"] > args["lr"]:
        raise ValueError(f"{PROG}: --min-lr {args['min_lr']} is above --lr {args['lr']}")
    if not Path(args["mm_data"]).is_file():
        raise FileNotFoundError(f"--mm-data {args['mm_data']}: no such file")
    if args.get("lora_target_modules") is not None:
        args["lora_target_modules"] = tuple(args["lora_target_modules"])
    r, alpha, drop = args.get("lora_r"), args.get("lora_alpha"), args.get("lora_dropout")
    if r is not None and r < 1:
        raise ValueError(f"{PROG}: --lora-r must be an integer >= 1 (the adapter rank), got {r}")
    if alpha is not None and not alpha > 0:
        raise ValueError(f"{PROG}: --lora-alpha must be > 0 (the update is scaled by alpha / r), got {alpha}")
    if drop is not None and not 0.0 <= drop < 1.0:
        raise ValueError(f"{PROG}: --lora-dropout must be in [0, 1), got {drop}")
    if args.get("lora_load"):
        if not Path(args["lora_load"]).exists():
            raise FileNotFoundError(f"--lora-load {args['lora_load']}: no such directory (a LoRA run's save dir "
                                    "or one of its iter_XXXXXXX checkpoints)")
    elif r is None and not args.get("load") and (alpha is not None or drop is not None
                                                   or args.get("lora_target_modules") is not None):
        raise ValueError(f"{PROG}: --lora-alpha/--lora-dropout/--lora-target-modules need --lora-r (LoRA is off "
                         "without it)")
    try:
        cfg = TrainConfig(**args, world_size=world_size, model=model, fsdp2=fsdp2, ignored_flags=tuple(sorted(set(ignored))))
    except ValidationError as exc:
        msgs = [f"--{'.'.join(map(str, e['loc'])).replace('_', '-')}: {e['msg']}" for e in exc.errors()]
        raise ValueError(f"{PROG}: " + "; ".join(msgs)) from None
    from mmtune.data.config import load_data_config
    from mmtune.train.compat import static_items

    data_cfg = load_data_config(cfg.mm_data)  # a data.json error shows now, before any process group or model
    return cfg.model_copy(update={"no_effect": tuple(static_items(cfg, data_cfg, _hf_config(model.init_from_hf_path)))})


def _hf_config(path: str | None) -> dict | None:
    """init_from_hf_path's config.json, or None where it is not readable yet (checked again when training)."""
    try:
        return read_mapping(Path(path) / "config.json", "json") if path else None
    except (OSError, ValueError):
        return None
