"""`mmtune train`: one process, or `torchrun --nproc_per_node N -m mmtune train ...`.

Thin: parse the flags (mmtune.train.args), build the parts — process group, sharded model
(mmtune.distributed), optimizer and schedule (train.optim), data loader (data.loader), checkpointer —
resume when --load names a training checkpoint, and run the loop (train.trainer).
"""

from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

PROG = "mmtune train"
DEFAULT_SEQ_LENGTH = 4096


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def run(cfg, *, print_fn=print) -> dict:
    """Train per a resolved TrainConfig; returns the end-of-run summary (rank 0; {} elsewhere)."""
    from mmtune.distributed import FSDPOptions, init_distributed, shutdown_distributed
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.models.glm4v_moe import Glm4vMoeConfig, Glm4vMoeForConditionalGeneration
    from mmtune.train.checkpoint import Checkpointer, TrainState, resolve_load_path
    from mmtune.train.metrics import MetricsLogger, text_flops_per_token
    from mmtune.train.optim import build_optimizer_and_scheduler
    from mmtune.train.profiling import Profiler, load_tools_json
    from mmtune.train.trainer import LoopSettings, Trainer

    backend = None if cfg.distributed_backend == "auto" else cfg.distributed_backend
    env = init_distributed(backend=backend, timeout_s=60 * cfg.distributed_timeout_minutes,
                           shard_size=cfg.fsdp2.sharding_size, cp=cfg.context_parallel_size,
                           ep=cfg.expert_model_parallel_size)
    say = print_fn if env.is_main else (lambda *a, **k: None)
    try:
        if env.world_size != cfg.world_size:
            raise ValueError(f"{PROG}: the config was resolved for {cfg.world_size} ranks but {env.world_size} run")
        _seed_everything(cfg.seed)
        from mmtune.data.config import load_data_config
        from mmtune.train.cores import apply_threads, choose_cores

        data_cfg = load_data_config(cfg.mm_data)
        loader_param = data_cfg.dataloader_param
        cores = choose_cores(cfg.num_threads, cfg.num_workers,
                             loader_param.num_workers if "num_workers" in loader_param.model_fields_set else None)
        apply_threads(cores)
        say(f"{PROG}: {cores.describe()}", flush=True)
        hf_path = cfg.model.init_from_hf_path
        if not hf_path:
            raise ValueError(f"{cfg.mm_model}: init_from_hf_path is required (the HF dir whose config.json "
                             "describes the model; its weights are used unless --load gives others)")
        if not (Path(hf_path) / "config.json").is_file():
            raise FileNotFoundError(f"{cfg.mm_model}: init_from_hf_path {hf_path} has no config.json")
        mcfg = Glm4vMoeConfig.from_pretrained(hf_path)
        env.dims.check_model(num_experts=mcfg.text.n_routed_experts, num_heads=mcfg.text.num_attention_heads)
        source = resolve_load_path(cfg.load) if cfg.load else None
        freeze = FreezeSpec(vision_encoder=cfg.model.freeze_vision_encoder,
                            vision_projector=cfg.model.freeze_vision_projector,
                            text_decoder=cfg.model.freeze_text_decoder)
        opts = FSDPOptions.from_config(
            cfg.fsdp2, activation_checkpointing=cfg.recompute_granularity == "full",
            recompute_num_layers=cfg.recompute_num_layers if cfg.recompute_method == "block" else None)
        opts.torch_compile = cfg.use_torch_compile
        opts.param_dtype = cfg.param_dtype(env.device.type)  # fp32 on the CPU
        if env.device.type != "cuda" or opts.param_dtype == torch.float32:
            opts.reduce_dtype = None  # reduce in the parameter dtype
        say(f"{PROG}: world size {env.world_size} on {env.device.type} ({env.dims.describe()}), "
            f"grad-accum {cfg.grad_accum_steps}, "
            f"load {source.kind + ' ' + str(source.path) if source else 'HF ' + hf_path}", flush=True)
        model = build_model(
            Glm4vMoeForConditionalGeneration, mcfg, env, opts, freeze, hf_path=hf_path, seed=cfg.seed,
            weights_dcp=source.path if source and source.kind == "weights" else None,
            load_weights=not (source and source.kind == "training"))
        counts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
        say(f"{PROG}: parameters trainable {counts['trainable']:,} frozen {counts['frozen']:,} (global)", flush=True)
        optimizer, scheduler = build_optimizer_and_scheduler(model, cfg)

        from mmtune.data.loader import build_train_loader

        seq_length = cfg.seq_length or DEFAULT_SEQ_LENGTH
        state = TrainState()
        consumed_for_loader = 0
        if source and source.kind == "training":
            from mmtune.train.checkpoint import peek_train_state

            saved = peek_train_state(source.path)
            if saved.get("world_size", env.world_size) != env.world_size:
                # the loader counts rows taken by all ranks together (global batch rows per step); the
                # checkpoint's consumed_samples counts real (packed) samples, so derive rows from the step
                consumed_for_loader = int(saved.get("step", 0)) * cfg.global_batch_size
                consumed_for_loader -= consumed_for_loader % env.dp_size
        loader = build_train_loader(data_cfg, seq_length=seq_length, micro_batch_size=cfg.micro_batch_size,
                                    dp_rank=env.dp_rank, dp_size=env.dp_size, seed=cfg.seed,
                                    num_workers=cores.workers, consumed_samples=consumed_for_loader,
                                    progress=env.is_main)
        if source and source.kind == "training":
            state = Checkpointer.load(source.path, model, optimizer, scheduler, loader,
                                      load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng)
            note = ""
            if state.extra.get("saved_world_size") != env.world_size:
                note = (f" (saved on {state.extra.get('saved_world_size')} ranks: model and optimizer resharded; "
                        f"data restarts after {consumed_for_loader} consumed samples; RNG not restored)")
            say(f"{PROG}: resumed from {source.path} at step {state.step}{note}", flush=True)
        if cfg.save and env.is_main:
            cfg.save_to(cfg.save)
        env.barrier()
        metrics_path = cfg.metrics_path
        metrics = MetricsLogger(
            metrics_file=metrics_path, tensorboard_dir=Path(cfg.save) / "tensorboard" if cfg.save else None,
            train_iters=cfg.train_iters, flops_per_token=text_flops_per_token(mcfg.text, seq_length),
            device=env.device, world_size=env.world_size, enabled=env.is_main, log_tps=True, print_fn=print_fn)
        if state.step:
            metrics.truncate_after(state.step)
        profiler = Profiler(load_tools_json(cfg.mm_tool), env.rank, env.device, print_fn) if cfg.mm_tool else None
        trainer = Trainer(LoopSettings.from_config(cfg, mcfg), env, model, optimizer, scheduler, loader,
                          checkpointer=Checkpointer(cfg.save, save_optim=not cfg.no_save_optim,
                                                    save_rng=not cfg.no_save_rng),
                          metrics=metrics, profiler=profiler, print_fn=print_fn)
        trainer.epoch = int(state.extra.get("epoch", 0))
        summary = trainer.fit(state)
        if profiler:
            profiler.close()
        metrics.close()
        if summary and env.is_main:
            say(f"{PROG}: done. mean step time {summary['mean_step_time_s']:.4f} s | samples/s "
                f"{summary['samples_per_s']:.2f} | tokens/s {summary['tokens_per_s']:.1f} | data wait "
                f"{100 * summary['data_wait_frac']:.1f}% of step time"
                + (f" | mfu {100 * summary['mfu']:.1f}%" if "mfu" in summary else "")
                + (f" | compiling: {summary['compile_s']:.1f} s over {summary['compile_steps']} step(s), not in the "
                   "means" if "compile_s" in summary else ""), flush=True)
        return summary if env.is_main else {}
    finally:
        shutdown_distributed()


def main(argv: list[str] | None = None) -> int:
    from mmtune.train.args import parse_train_args
    from mmtune.train.trainer import NonFiniteLossError

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cfg = parse_train_args(argv)
    except SystemExit as e:  # --help
        return int(e.code or 0)
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg)
    except NonFiniteLossError as e:
        print(f"{PROG}: stopped: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
