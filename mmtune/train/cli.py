"""`mmtune train`: one process, or `torchrun --nproc_per_node N -m mmtune train ...`.

Thin, in the order the work happens: parse the flags (mmtune.train.args) -> process group -> the data
loader (data.loader; the data cache is built or read here, so a data error costs seconds, not a sharded
model load) -> the sharded model (train.model_build, mmtune.distributed) -> optimizer and schedule
(train.optim) -> checkpointer (resume when --save already holds a checkpoint -- automatic resume -- or
--load names a training checkpoint) -> the loop (train.trainer). A collective that fails (another rank
died or hung past --distributed-timeout-minutes) ends the run with one line naming it
(distributed/errors.py).
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from pathlib import Path

import numpy as np
import torch

PROG = "mmtune train"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_model_json(cfg, arch, hf_path) -> None:
    """model.json must describe the architecture of its init_from_hf_path (ValueError naming both files);
    features that need routed experts must not be asked of a dense model."""
    m = cfg.model
    arch.check_model_ids({"model": m.model_id, "vision_encoder": m.image_encoder.vision_encoder.model_id,
                          "text_decoder": m.text_decoder.model_id}, str(cfg.mm_model), f"{hf_path}/config.json")
    if cfg.loss.router_aux_loss_coef > 0:
        arch.require_experts(f"{cfg.mm_model}: loss_cfg.router_aux_loss_coef {cfg.loss.router_aux_loss_coef}")
    if cfg.moe_router_bias_update_rate > 0:
        arch.require_experts(f"--moe-router-bias-update-rate {cfg.moe_router_bias_update_rate}")


def run(cfg, *, print_fn=print) -> dict:
    """Train per a resolved TrainConfig; returns the end-of-run summary (rank 0; {} elsewhere)."""
    from mmtune.distributed import FSDPOptions, init_distributed, shutdown_distributed
    from mmtune.distributed.errors import CollectiveError, collective_failure
    from mmtune.train.freeze import FreezeSpec
    from mmtune.train.model_build import build_model
    from mmtune.models import load_config
    from mmtune.train.checkpoint import Checkpointer, LoadSource, TrainState, latest_checkpoint, resolve_load_path
    from mmtune.train.metrics import MetricsLogger, text_flops_per_token
    from mmtune.train.optim import build_optimizer_and_scheduler
    from mmtune.train.profiling import Profiler, load_tools_json
    from mmtune.train.compat import format_line, runtime_items
    from mmtune.train.model_options import apply_model_options, attention_backends
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
        arch, mcfg = load_config(hf_path)  # the architecture comes from config.json's model_type
        check_model_json(cfg, arch, hf_path)
        env.dims.check_model(num_experts=arch.num_experts(mcfg), num_heads=mcfg.text.num_attention_heads)
        source = resolve_load_path(cfg.load) if cfg.load else None
        source_name, lora_load = f"--load {cfg.load}", cfg.lora_load
        resume = None if cfg.no_auto_resume else latest_checkpoint(cfg.save)
        if resume is not None:  # automatic resume: --save holds a complete checkpoint, continue from it
            source = LoadSource("training", resume, int(resume.name.split("_")[-1]))
            # what --load / --lora-load started from lives on in the checkpoint (a relaunch with the same
            # command, e.g. after a failure, continues the run)
            source_name, lora_load = f"the auto-resume checkpoint {resume}", None
            say(f"{PROG}: auto-resume from {resume} (the latest checkpoint in --save"
                + "".join(f"; {flag} {value} only starts fresh runs"
                          for flag, value in (("--load", cfg.load), ("--lora-load", cfg.lora_load)) if value)
                + "; --no-auto-resume to start over)", flush=True)
        lora, lora_source, weights_dcp, base_hf = _resolve_lora(cfg, source, source_name, lora_load)
        vision_attn, text_attn = attention_backends(cfg.model, cfg.use_flash_attn)
        on_cuda = env.device.type == "cuda"
        line = format_line([*cfg.no_effect, *runtime_items(
            cfg, device_type=env.device.type, load_kind=source.kind if source else None,
            flash="flash" in (vision_attn, text_attn))], PROG)
        if line:
            say(line, flush=True)

        # data before the model: the cache is built (one process) or read now
        from mmtune.data.loader import build_train_loader

        # how the data is laid out over ranks and loader workers: the loader's saved per-rank states count each
        # rank's (and worker's) own batches, so they resume exactly only on the same layout
        layout = {"world_size": env.world_size, "dp_size": env.dp_size, "micro_batch_size": cfg.micro_batch_size,
                  "global_batch_size": cfg.global_batch_size, "num_workers": cores.workers}
        consumed_for_loader, stream_start, layout_changed = 0, None, {}
        if source and source.kind == "training":
            from mmtune.train.checkpoint import peek_train_state

            saved = peek_train_state(source.path)
            # (a checkpoint from before the layout was recorded knows only its world size)
            saved_layout = ((saved.get("extra") or {}).get("data_layout")
                            or {"world_size": saved.get("world_size", env.world_size)})
            layout_changed = {k: (v, layout[k]) for k, v in saved_layout.items() if k in layout and v != layout[k]}
            if layout_changed:  # the loader starts after what the saved run consumed, counted over all ranks
                position = (saved.get("extra") or {}).get("stream_position")
                if data_cfg.basic.streaming and position is not None:
                    # where the slowest rank's stream stood, and the open rows before it (trainer.py
                    # _stream_position): no sample is skipped; what a faster rank had trained past it comes again
                    stream_start = position
                elif data_cfg.basic.streaming:
                    # (a checkpoint without the position) a stream is read sample by sample, round-robin over
                    # the ranks: after as many samples as were trained. Exact when every rank trained the same
                    # number (no packing, no dropped samples); otherwise a rank that read ahead had trained
                    # samples past that point (read again) and one behind had untrained ones before it (skipped)
                    consumed_for_loader = int(saved.get("consumed_samples", 0))
                else:  # the cached rows: the saved run took its global batch of rows per step
                    consumed_for_loader = int(saved.get("step", 0)) * int(
                        saved_layout.get("global_batch_size", cfg.global_batch_size))
                consumed_for_loader -= consumed_for_loader % env.dp_size
        loader = build_train_loader(data_cfg, seq_length=cfg.seq_length, micro_batch_size=cfg.micro_batch_size,
                                    dp_rank=env.dp_rank, dp_size=env.dp_size, seed=cfg.seed,
                                    num_workers=cores.workers, consumed_samples=consumed_for_loader,
                                    stream_start=stream_start,
                                    progress=env.is_main, pin_memory=data_cfg.dataloader_param.pin_memory and on_cuda)
        if loader.prepared is not None and loader.prepared.from_cache:  # (a build logs itself, on its process)
            say(f"{PROG}: {loader.prepared.note}", flush=True)
        freeze = FreezeSpec(vision_encoder=cfg.model.freeze_vision_encoder,
                            vision_projector=cfg.model.freeze_vision_projector,
                            text_decoder=cfg.model.freeze_text_decoder)
        opts = FSDPOptions.from_config(
            cfg.fsdp2, activation_checkpointing=cfg.recompute_granularity == "full",
            recompute_num_layers=cfg.recompute_num_layers if cfg.recompute_method == "block" else None)
        opts.param_dtype = cfg.param_dtype(env.device.type)  # fp32 on the CPU
        opts.activation_offload = cfg.model.text_decoder.activation_offload and on_cuda
        opts.torch_compile = cfg.use_torch_compile
        if env.device.type != "cuda" or opts.param_dtype == torch.float32:
            opts.reduce_dtype = None  # reduce in the parameter dtype
        say(f"{PROG}: world size {env.world_size} on {env.device.type} ({env.dims.describe()}), "
            f"grad-accum {cfg.grad_accum_steps}, "
            f"load {source.kind + ' ' + str(source.path) if source else 'hf ' + hf_path}", flush=True)
        kind = source.kind if source else "hf"  # hf: --load HF_DIR, or init_from_hf_path's weights
        if kind == "hf" and source is not None:
            hf_path = str(source.path)
        elif base_hf is not None:  # a resumed LoRA run: its base weights come from the HF dir it started from
            hf_path = base_hf
        model = build_model(
            arch.model_class, mcfg, env, opts, freeze, seed=cfg.seed,
            hf_path=hf_path if kind == "hf" or (lora is not None and weights_dcp is None) else None,
            weights_dcp=weights_dcp, load_weights=kind != "training" or lora is not None, lora=lora)
        apply_model_options(model, vision_attn=vision_attn, text_attn=text_attn, grouped_mm=cfg.model.grouped_gemm)
        counts = {"trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                  "frozen": sum(p.numel() for p in model.parameters() if not p.requires_grad)}
        say(f"{PROG}: parameters trainable {counts['trainable']:,} frozen {counts['frozen']:,} (global)", flush=True)
        lora_blob = None
        if lora is not None:
            from mmtune.train.lora import lora_modules, metadata

            modules = lora_modules(model)
            n_exp = sum(kind == "experts" for kind in modules.values())
            say(f"{PROG}: LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {len(modules) - n_exp} "
                f"linear modules and {n_exp} routed-expert banks ({' '.join(lora.targets)})", flush=True)
            base = {"weights_dcp": str(Path(weights_dcp).resolve())} if weights_dcp else {"hf": str(hf_path)}
            lora_blob = metadata(lora, modules, base)
        optimizer, scheduler = build_optimizer_and_scheduler(model, cfg)
        if lora_source is not None:
            Checkpointer.load_adapters(lora_source, model)
            say(f"{PROG}: adapters from {lora_source} (--lora-load), starting at step 0", flush=True)

        state = TrainState()
        if source and source.kind == "training":
            state = Checkpointer.load(source.path, model, optimizer, scheduler, None if layout_changed else loader,
                                      load_optim=not cfg.no_load_optim, load_rng=not cfg.no_load_rng)
            note = ""
            if layout_changed:
                unit = "samples" if data_cfg.basic.streaming else "rows"
                where = (f"at sample {stream_start['k']} of pass {stream_start['epoch']} of the stream, where the "
                         f"slowest rank stood, with {sum(map(len, stream_start['open']))} earlier samples of open "
                         f"rows" if stream_start else f"after the {consumed_for_loader} {unit} consumed")
                note = (f" (saved with {', '.join(f'{k} {a}' for k, (a, _) in layout_changed.items())}: the data "
                        f"restarts {where}"
                        + ("; model and optimizer resharded; RNG not restored" if "world_size" in layout_changed
                           else "") + ")")
            say(f"{PROG}: resumed from {source.path} at step {state.step}{note}", flush=True)
            changed = state.extra.pop("settings_changed", {})
            if changed:
                flags = {"lr": "--lr", "weight_decay": "--weight-decay", "betas": "--adam-beta1/2", "eps": "--adam-eps"}
                say(f"{PROG}: the flags' optimizer settings replace the checkpoint's: "
                    + ", ".join(f"{flag} {changed[k][0]} -> {changed[k][1]}"
                                for k, flag in flags.items() if k in changed)
                    + " (the schedule continues at its step)", flush=True)
        if cfg.save and env.is_main:
            cfg.save_to(cfg.save)
        env.barrier()
        metrics_path = cfg.metrics_path
        metrics = MetricsLogger(
            metrics_file=metrics_path, tensorboard_dir=Path(cfg.save) / "tensorboard" if cfg.save else None,
            train_iters=cfg.train_iters, flops_per_token=text_flops_per_token(mcfg.text, cfg.seq_length),
            device=env.device, world_size=env.world_size, enabled=env.is_main, log_tps=cfg.log_tps, print_fn=print_fn)
        metrics.truncate_after(state.step)  # rows of a run that died after its last checkpoint (or before one)
        profiler = Profiler(load_tools_json(cfg.mm_tool), env.rank, env.device, print_fn) if cfg.mm_tool else None
        checkpointer = Checkpointer(cfg.save, save_optim=not cfg.no_save_optim, save_rng=not cfg.no_save_rng,
                                    lora=lora_blob, async_save=cfg.async_save,
                                    keep_latest=cfg.keep_latest_checkpoints, print_fn=say)
        trainer = Trainer(LoopSettings.from_config(cfg, mcfg), env, model, optimizer, scheduler, loader,
                          checkpointer=checkpointer, metrics=metrics, profiler=profiler, print_fn=print_fn)
        trainer.epoch = int(state.extra.get("epoch", 0))
        trainer.data_layout = layout  # saved with each checkpoint (see above)
        try:
            summary = trainer.fit(state)
        except BaseException:
            with contextlib.suppress(Exception):  # keep the original error; a save in flight still completes
                checkpointer.close()
            raise
        checkpointer.close()  # the last (asynchronous) save is complete and published before the run ends
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
    except RuntimeError as e:
        what = collective_failure(e)  # read the flight recorder before the process group goes away
        if what is None:
            raise
        raise CollectiveError(what) from e
    finally:
        shutdown_distributed()


def _resolve_lora(cfg, source, source_name: str, lora_load: str | None):
    """(LoRAConfig or None, the --lora-load checkpoint dir or None, the weights-only DCP the base loads from or
    None, the HF dir the base loads from when a resumed LoRA run started from one, or None). A LoRA checkpoint
    to resume (`source`, named `source_name` in errors: --load or the auto-resume one) continues with its own
    settings and base; `lora_load` (--lora-load, None on auto-resume) takes another run's adapters (and their
    settings, unless flags say otherwise) onto this run's base."""
    from mmtune.train.checkpoint import peek_lora, resolve_load_path
    from mmtune.train.lora import read_metadata

    weights_dcp = source.path if source and source.kind == "weights" else None
    base_hf = None
    saved = None
    resume_blob = peek_lora(source.path) if source and source.kind == "training" else None
    if resume_blob is not None:
        saved = read_metadata(resume_blob)
        if lora_load:
            raise ValueError(f"{PROG}: {source_name} resumes a LoRA run and --lora-load {lora_load} starts "
                             "from other adapters: give one of them")
        base = saved.get("base") or {}
        if base.get("weights_dcp"):
            weights_dcp = Path(base["weights_dcp"])
            if not (weights_dcp / ".metadata").is_file():
                raise FileNotFoundError(f"{source_name}: the LoRA run's base weights {weights_dcp} (a converted "
                                        "DCP) are gone; the adapters only make sense on top of them")
        elif base.get("hf"):
            base_hf = base["hf"]
            if not (Path(base_hf) / "config.json").is_file():
                raise FileNotFoundError(f"{source_name}: the LoRA run's base HF dir {base_hf} is gone; the "
                                        "adapters only make sense on top of it")
    lora_source = None
    if lora_load:
        try:
            found = resolve_load_path(lora_load)
        except FileNotFoundError as e:
            raise FileNotFoundError(f"--lora-load {lora_load}: not a LoRA checkpoint (a LoRA run's save dir or "
                                    f"iter_XXXXXXX; a PEFT adapter dir cannot be continued yet): {e}") from None
        blob = peek_lora(found.path) if found.kind == "training" else None
        if blob is None:
            raise ValueError(f"--lora-load {lora_load}: not a LoRA checkpoint (it has no adapters); pass the save "
                             "dir or an iter_XXXXXXX of a run trained with --lora-r")
        saved, lora_source = read_metadata(blob), found.path
    lora = cfg.lora_config(saved)
    if lora is not None and source is not None and source.kind == "training" and resume_blob is None:
        raise ValueError(f"{PROG}: {source_name} is a full-finetuning checkpoint; LoRA starts from base weights: "
                         "export it (mmtune convert dcp-to-hf) and point init_from_hf_path at it, or pass a "
                         "converted weights-only DCP to --load")
    return lora, lora_source, weights_dcp, base_hf


def main(argv: list[str] | None = None) -> int:
    from mmtune.distributed.errors import CollectiveError
    from mmtune.train.args import parse_train_args
    from mmtune.train.checkpoint import CheckpointSaveError
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
    except (CollectiveError, CheckpointSaveError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
