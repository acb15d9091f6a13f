"""The training loop: grad-accum windows, loss, clipping, AdamW, LR schedule, logging, checkpoints.

One optimizer step ("step") consumes a window of G = global_batch / (micro_batch * dp) micro-batches on
each rank. The whole window is fetched first (the recipe's PrefetchGradAccDataLoader) so that the loss
context — the window's valid-token count over all ranks, for per_token_loss — is known before the first
micro-batch (`LossContext.for_window`, one all-reduce). Each micro-batch's backward reduce-scatters its
gradients, so only sharded gradients accumulate over the window (under HSDP the all-reduce across
replicas waits for the last micro-batch; `set_gradient_sync`). Then: clip (the total norm over every
parameter's shards, dense and expert: distributed/grad_norm.py), and — unless the loss or the norm is not
finite, in which case the step is skipped and counted — AdamW, the LR scheduler step and (with
--moe-router-bias-update-rate) the router bias update from the step's expert loads (train/moe_balance.py),
which are also logged.

Every rank runs the vision tower on every micro-batch (`run_vision_without_images=True`), on a dummy
image when its batch has none, so FSDP's all-gathers of the vision blocks always match across ranks.

Context parallelism (--context-parallel-size > 1): the ranks of a cp group read the same micro-batches;
each is padded to a multiple of cp tokens per row, the model keeps S/cp of them per rank
(distributed/context_parallel.py) and the loss cuts its weights the same way (train/loss.py). Tokens and
samples are counted once per cp group.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn

from mmtune.data.loader import StreamingRows, resume_point, stream_progress
from mmtune.distributed.context_parallel import ContextParallel
from mmtune.distributed.env import DistEnv
from mmtune.distributed.grad_norm import clip_grad_norm
from mmtune.distributed.parallelize import set_gradient_sync, unshard_lm_head
from mmtune.train.checkpoint import Checkpointer, TrainState
from mmtune.train.loss import LossContext, lm_loss
from mmtune.train.metrics import MetricsLogger, StepStats
from mmtune.train.moe_balance import expert_loads, load_summary, routers, update_router_bias
from mmtune.train.profiling import Profiler

_TENSOR_KEYS = ("input_ids", "labels", "position_ids", "cu_seqlens", "pixel_values", "image_grid_thw",
                "pixel_values_videos", "video_grid_thw")


def _frames_compiled() -> int:
    """Frames torch.compile has compiled so far in this process (0 when nothing is compiled)."""
    dynamo = sys.modules.get("torch._dynamo.utils")  # not imported: nothing was compiled
    return dynamo.counters["frames"].get("ok", 0) if dynamo is not None else 0


class NonFiniteLossError(RuntimeError):
    """Raised after --max-nonfinite-steps consecutive steps with a non-finite loss or gradient norm."""


@dataclass
class LoopSettings:
    """The parts of TrainConfig the loop reads (kept small so tests can build it directly)."""

    train_iters: int
    grad_accum_steps: int
    loss_type: str = "default"
    compute_mode: str = "default"
    chunk_size: int = 1024
    router_aux_loss_coef: float = 0.0
    clip_grad: float = 0.0  # 0: no clipping (the norm is still computed and logged)
    log_interval: int = 1
    save_interval: int | None = None
    exit_interval: int | None = None
    max_nonfinite_steps: int = 3  # as --max-nonfinite-steps
    pad_token_id: int | None = None  # tokens equal to it are not counted as throughput or for the aux loss
    num_experts: int | None = None
    top_k: int | None = None
    router_bias_update_rate: float = 0.0  # --moe-router-bias-update-rate (0: the bias stays as loaded)

    @classmethod
    def from_config(cls, cfg, model_config=None) -> "LoopSettings":
        text = getattr(model_config, "text", None)
        return cls(
            train_iters=cfg.train_iters, grad_accum_steps=cfg.grad_accum_steps, loss_type=cfg.loss.loss_type,
            compute_mode=cfg.loss.compute_mode, chunk_size=cfg.loss.chunk_size,
            router_aux_loss_coef=cfg.loss.router_aux_loss_coef, clip_grad=cfg.clip_grad,
            log_interval=cfg.log_interval, save_interval=cfg.save_interval, exit_interval=cfg.exit_interval,
            max_nonfinite_steps=cfg.max_nonfinite_steps,
            pad_token_id=getattr(text, "pad_token_id", None) if text is not None else None,
            num_experts=getattr(text, "n_routed_experts", None), top_k=getattr(text, "num_experts_per_tok", None),
            router_bias_update_rate=cfg.moe_router_bias_update_rate,
        )


@dataclass
class StepResult:
    loss: float
    aux_loss: float
    grad_norm: float
    tokens: int
    samples: int
    skipped: bool
    expert_load: torch.Tensor | None = None  # [MoE layers, E] tokens per expert, summed over ranks


class Trainer:
    def __init__(self, settings: LoopSettings, env: DistEnv, model: nn.Module, optimizer, scheduler,
                 loader: Iterable[dict[str, Any]], *, checkpointer: Checkpointer | None = None,
                 metrics: MetricsLogger | None = None, profiler: Profiler | None = None, print_fn=print):
        self.s = settings
        self.env = env
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loader = loader
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.profiler = profiler
        self.print = print_fn if env.is_main else (lambda *a, **k: None)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.cp = ContextParallel.from_mesh(env.dims.cp_mesh)  # None unless --context-parallel-size > 1
        dp_mesh = env.dims.dp_mesh
        self.dp_group = dp_mesh.get_group() if dp_mesh is not None else None  # None: every rank
        self.gates = routers(model)
        self._it = None
        self.epoch = 0
        # ranks, batch sizes and loader workers (train/cli.py): a resume on another layout cannot use the
        # loader's per-rank states and restarts the data after what was consumed instead
        self.data_layout: dict[str, int] | None = None
        self.nonfinite_in_a_row = 0
        self.nonfinite_total = 0
        self.losses: list[float] = []  # every step's global loss (tests compare runs with it)

    # ------------------------------------------------------------------------------------- data

    def _next_batch(self) -> dict[str, Any]:
        if self._it is None:
            # a DataLoader's iter() draws its base seed from the global generator; a resumed run has just
            # restored that generator's state, so the draw would shift every later random number (dropout)
            # against the uninterrupted run. Outside the stream, the two runs draw alike.
            with torch.random.fork_rng(devices=[]):
                self._it = iter(self.loader)
        try:
            return next(self._it)
        except StopIteration:
            self.epoch += 1
            self._it = iter(self.loader)
            try:
                return next(self._it)
            except StopIteration:
                raise ValueError("the data loader yields no batch: the data set is smaller than one "
                                 "micro-batch per rank (with drop_last); add data or lower --micro-batch-size") from None

    def _to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        dev = self.env.device
        return {k: (v.to(dev, non_blocking=True) if isinstance(v, torch.Tensor) and k in _TENSOR_KEYS else v)
                for k, v in batch.items()}

    # ------------------------------------------------------------------------------------- step

    def train_step(self, window: list[dict[str, Any]]) -> StepResult:
        """One optimizer step over a prefetched window of micro-batches (already on the device)."""
        s, model = self.s, self.model
        model.train()
        ctx = LossContext.for_window(s.loss_type, [(b["labels"], b.get("cu_seqlens")) for b in window],
                                     group=self.dp_group)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        aux_sum = torch.zeros((), dtype=torch.float64, device=self.env.device)
        tokens = samples = 0
        loads = None
        for i, batch in enumerate(window):
            set_gradient_sync(model, last_micro_batch=i == len(window) - 1)
            token_mask = None
            if s.pad_token_id is not None:
                token_mask = batch["input_ids"] != s.pad_token_id
            if self.cp is not None:
                batch, token_mask = self.cp.pad_batch(batch, token_mask, s.pad_token_id)
            out = model(
                input_ids=batch["input_ids"], pixel_values=batch.get("pixel_values"),
                image_grid_thw=batch.get("image_grid_thw"), position_ids=batch.get("position_ids"),
                cu_seqlens=batch.get("cu_seqlens"), return_logits=False, run_vision_without_images=True,
                pixel_values_videos=batch.get("pixel_values_videos"), video_grid_thw=batch.get("video_grid_thw"),
            )
            lo = lm_loss(
                out.hidden_states, unshard_lm_head(model), batch["labels"], ctx, cu_seqlens=batch.get("cu_seqlens"),
                micro_step=i, compute_mode=s.compute_mode, chunk_size=s.chunk_size,
                router_logits=out.router_logits, router_aux_loss_coef=s.router_aux_loss_coef,
                num_experts=s.num_experts, top_k=s.top_k, token_mask=token_mask, cp=self.cp,
            )
            lo.loss_for_backward.backward()
            if self.gates:  # router logits hold this rank's tokens (its S/cp share under cp)
                local_mask = self.cp.local(token_mask, 1) if self.cp is not None else token_mask
                load = expert_loads(self.gates, out.router_logits, local_mask)
                loads = load if loads is None else loads + load
            loss_sum += lo.loss_value.double()
            aux_sum += lo.aux_value.double()
            if self.cp is None or self.cp.rank == 0:  # a cp group shares one micro-batch: count it once
                tokens += int(token_mask.sum()) if token_mask is not None else batch["input_ids"].numel()
                samples += int(batch.get("num_samples", batch["input_ids"].shape[0]))
        totals = torch.stack([loss_sum, aux_sum, torch.tensor(float(tokens), dtype=torch.float64, device=loss_sum.device),
                              torch.tensor(float(samples), dtype=torch.float64, device=loss_sum.device)])
        if loads is not None:  # summed over ranks in the same all-reduce (exact in float64)
            totals = torch.cat([totals, loads.reshape(-1).to(totals)])
        if self.env.distributed:
            dist.all_reduce(totals)
        loss, aux = float(totals[0]), float(totals[1])
        loads = totals[4:].view_as(loads).cpu() if loads is not None else None
        grad_norm = self._clip()
        skipped = not (math.isfinite(loss) and math.isfinite(aux) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            if self.checkpointer is not None:
                self.checkpointer.wait_staged()  # an --async-save copy of the weights must finish before they change
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if s.router_bias_update_rate > 0 and loads is not None:
                update_router_bias(self.gates, loads, s.router_bias_update_rate)
        return StepResult(loss, aux, grad_norm, int(totals[2]), int(totals[3]), skipped, loads)

    def _clip(self) -> float:
        """Total gradient norm over all trainable parameters, dense and expert (every rank gets the same
        number); clips to --clip-grad when > 0."""
        return clip_grad_norm(self.params, self.s.clip_grad if self.s.clip_grad > 0 else float("inf"))

    # ------------------------------------------------------------------------------------- loop

    def fit(self, state: TrainState) -> dict[str, float]:
        """Train from `state.step` to train_iters (or the exit interval); save on schedule and at the end."""
        s = self.s
        step, consumed = state.step, state.consumed_samples
        self.nonfinite_in_a_row = int(state.extra.get("nonfinite_in_a_row", 0))
        self.nonfinite_total = int(state.extra.get("nonfinite_total", 0))
        if step >= s.train_iters:
            self.print(f"nothing to do: the checkpoint is at step {step} and --train-iters is {s.train_iters}")
            return {}
        while step < s.train_iters:
            if self.profiler:
                self.profiler.step_begin(step + 1)
            t0 = time.perf_counter()
            window = [self._to_device(self._next_batch()) for _ in range(s.grad_accum_steps)]
            data_wait = time.perf_counter() - t0
            frames = _frames_compiled()
            result = self.train_step(window)
            if self.env.device.type == "cuda":
                torch.cuda.synchronize(self.env.device)
            step_time = time.perf_counter() - t0
            step += 1
            consumed += result.samples
            if self.profiler:
                self.profiler.step_end(step)
            self.losses.append(result.loss)
            if result.skipped:
                self.nonfinite_in_a_row += 1
                self.nonfinite_total += 1
            else:
                self.nonfinite_in_a_row = 0
            if self.metrics:
                lr = self.optimizer.param_groups[0]["lr"]
                extra = {"aux_loss": result.aux_loss} if s.router_aux_loss_coef > 0 else {}
                if self.nonfinite_total:
                    extra["nonfinite_steps"] = self.nonfinite_total
                log = step % s.log_interval == 0 or step == s.train_iters or result.skipped
                if log and result.expert_load is not None:
                    extra.update(load_summary(result.expert_load))
                self.metrics.record(StepStats(step, result.loss, lr, result.grad_norm, step_time, result.tokens,
                                              result.samples, result.skipped, extra, data_wait=data_wait,
                                              compiling=_frames_compiled() > frames), log=log)
            if self.nonfinite_in_a_row >= s.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"step {step}: the loss or gradient norm was not finite in {self.nonfinite_in_a_row} steps in a "
                    f"row (--max-nonfinite-steps {s.max_nonfinite_steps}); the last good checkpoint is kept. Lower "
                    "--lr, set --clip-grad, or check the data (mmtune data check)")
            exiting = bool(s.exit_interval) and step % s.exit_interval == 0 and step < s.train_iters
            scheduled = bool(s.save_interval) and step % s.save_interval == 0
            if self.checkpointer and self.checkpointer.save_dir and (scheduled or exiting or step == s.train_iters):
                self.save(step, consumed)
            if exiting:
                self.print(f"exit interval: stopping at step {step} (--exit-interval {s.exit_interval})")
                break
        return self.metrics.summary() if self.metrics else {}

    def _stream_position(self) -> dict | None:
        """Streaming data: where a resume on another layout starts the stream (data/loader.py `resume_point`
        of every rank's `StreamingRows.progress`): no sample skipped, the few a faster rank had trained past
        the slowest one's position read again. None for cached data, or when a rank cannot tell its position."""
        if not isinstance(getattr(self.loader, "dataset", None), StreamingRows):
            return None
        progress = [stream_progress(self.loader)]
        if self.env.distributed:  # every rank (the ranks of a context-parallel group repeat their data's)
            gathered = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, progress[0])
            progress = gathered
        if any(p is None for p in progress):
            return None
        return resume_point([w for p in progress for w in p])

    def save(self, step: int, consumed: int) -> None:
        extra = {"nonfinite_in_a_row": self.nonfinite_in_a_row, "nonfinite_total": self.nonfinite_total,
                 "epoch": self.epoch}
        if self.data_layout is not None:
            extra["data_layout"] = self.data_layout
        position = self._stream_position()
        if position is not None:
            extra["stream_position"] = position
        ck = self.checkpointer
        path = ck.save(step, self.model, self.optimizer, self.scheduler, self.loader,
                       TrainState(step=step, consumed_samples=consumed, extra=extra))
        if ck.async_save:  # "saved checkpoint ..." follows once it is written (Checkpointer._finish_async)
            self.print(f"checkpoint {path.name}: copying and writing in the background (the loop waited "
                       f"{ck.last_blocked_s:.2f} s)", flush=True)
        else:
            self.print(f"saved checkpoint {path}", flush=True)
