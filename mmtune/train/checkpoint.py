"""Training checkpoints with DCP: atomic, resumable, reshardable.

Layout (the recipe's, Megatron-style):
    <save>/iter_0000010/                 one torch.distributed.checkpoint (DCP) directory
    <save>/latest_checkpointed_iteration.txt   "10" — written last, atomically

Keys inside a training checkpoint (docs/INTERNALS.md; `mmtune convert dcp-to-hf` reads the "model." ones):
    model.<native name>          model weights (DTensor shards: DCP reshards them to any world size)
    optim.state.<fqn>.<key> / optim.param_groups   AdamW state (unless --no-save-optim)
    train_state                  bytes: step, consumed samples, world size, LR scheduler state
    rank_state.<r>               bytes, one per rank: RNG states (unless --no-save-rng), data-loader state
    lora                         LoRA runs only: JSON bytes (train/lora.metadata); then `model.` holds only
                                 the adapters (`...lora_A` / `...lora_B`) — the base comes from the base weights
A converted weights-only DCP (`mmtune convert hf-to-dcp`) holds plain native names and loads as step 0.

Atomicity (the pointer contract, docs/INTERNALS.md): every rank writes into `<save>/.iter_XXXXXXX.tmp`; once
the write is complete on every rank, rank 0 renames it to `iter_XXXXXXX` and then replaces the pointer via a
temporary file + os.replace. A process killed at any moment leaves the previous checkpoint and a pointer to a
complete checkpoint. Synchronous saves know "complete on every rank" from a barrier after `dcp.save`.

Asynchronous saves (`--async-save`): `dcp.async_save` copies the state into a CPU staging buffer (reused
from save to save; pinned on CUDA) on a background thread while the next step's forward and backward run —
the trainer waits for that copy only before its next optimizer step (`wait_staged`), the one thing that
changes the weights — and then writes it from another background thread whose collectives run on a
separate gloo group. DCP's coordinator (rank 0) writes the
`.metadata` only after gathering every rank's write results, so when rank 0's write finishes the save is
complete everywhere; a second background step then renames and moves the pointer. The next save (and the
end of training) first waits for the previous one. `--keep-latest-checkpoints K` deletes older `iter_*`
after each publication, never the pointer's and never a `.tmp` one still being written.

The opaque byte blobs are serialised with torch.save and read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import shutil
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmtune.ops.lora import is_adapter_name

from mmtune.convert.dcp_io import LATEST_FILE as POINTER_FILE  # the key/file contract with convert
from mmtune.convert.dcp_io import resolve_dcp_dir
from mmtune.convert.dcp_io import LORA_KEY, MODEL_PREFIX, OPTIM_PREFIX

_MODEL_KEY, _OPTIM_KEY = MODEL_PREFIX.rstrip("."), OPTIM_PREFIX.rstrip(".")  # dcp flattens {"model": sd} to "model."
_ADAPTERS = StateDictOptions(ignore_frozen_params=True, strict=False)  # a LoRA run: the trainable tensors only


def iter_dir_name(step: int) -> str:
    return f"iter_{step:07d}"


# ---------------------------------------------------------------------------------------------- blobs


def _to_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


def rng_state() -> dict[str, Any]:
    """Every generator a training step can draw from, in a weights_only-loadable form."""
    np_state = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]) + [random.getstate()[0], random.getstate()[2]],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[-2], tuple(py[:-2]), py[-1]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np_state[1].numpy().astype(np.uint32), *np_state[2:]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -------------------------------------------------------------------------------------------- finding


@dataclass
class LoadSource:
    """What `--load PATH` points at."""

    kind: str  # "training" (resume) | "weights" (converted DCP: step 0) | "hf" (HF model dir: step 0)
    path: Path  # the DCP directory or the HF dir
    step: int = 0


def resolve_load_path(path: str | Path) -> LoadSource:
    """A save dir with the pointer file, an iter_XXXXXXX dir, a converted weights-only DCP dir, or an HF
    model dir (config.json + safetensors, read slice by slice: train/hf_load.py)."""
    from mmtune.train.hf_load import is_hf_dir

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--load {path}: no such directory (expected a save dir with {POINTER_FILE}, "
                                "an iter_XXXXXXX checkpoint, a DCP from `mmtune convert hf-to-dcp` or an HF "
                                "model dir with config.json and safetensors)")
    if (path / POINTER_FILE).is_file():
        ckpt = resolve_dcp_dir(path)  # reads and checks the pointer (the contract shared with convert)
        return LoadSource("training", ckpt, int(ckpt.name.split("_")[-1]))
    if not (path / ".metadata").is_file():
        if is_hf_dir(path):
            return LoadSource("hf", path, 0)
        raise FileNotFoundError(f"--load {path}: neither {POINTER_FILE}, a DCP .metadata file nor an HF model "
                                "(config.json + model.safetensors[.index.json]) is there")
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    if "train_state" in keys:
        step = int(path.name.split("_")[-1]) if path.name.startswith("iter_") else 0
        return LoadSource("training", path, step)
    return LoadSource("weights", path, 0)


def latest_checkpoint(save_dir: str | Path | None) -> Path | None:
    """The complete checkpoint `save_dir`'s pointer names (automatic resume), or None when there is no
    pointer yet. A pointer naming a missing checkpoint is an error, not a fresh start."""
    if not save_dir or not (Path(save_dir) / POINTER_FILE).is_file():
        return None
    return resolve_dcp_dir(save_dir)


_ITER_RE = re.compile(r"^iter_(\d{7})$")


def checkpoint_keys(path: str | Path) -> set[str]:
    return set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys())


# ------------------------------------------------------------------------------------------- saving


@dataclass
class TrainState:
    """What the trainer passes in and gets back."""

    step: int = 0
    consumed_samples: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. non-finite counters


def _rank_world() -> tuple[int, int]:
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class Checkpointer:
    """Saves and loads model, optimizer, scheduler, RNG and data-loader state under one save dir.

    lora: a LoRA run's metadata blob (train/lora.metadata): checkpoints then hold only the adapters.
    async_save: write in the background after a blocking copy into a staging buffer (module docstring).
    keep_latest: keep only the newest K complete checkpoints (and always the pointer's); 0 keeps all.
    Collective: every rank constructs it (the async gloo group) and calls save/wait/close.
    """

    def __init__(self, save_dir: str | Path | None, *, save_optim: bool = True, save_rng: bool = True,
                 lora: bytes | None = None, async_save: bool = False, keep_latest: int = 0, print_fn=None):
        if keep_latest < 0:
            raise ValueError(f"--keep-latest-checkpoints must be >= 0 (0 keeps all), got {keep_latest}")
        self.save_dir = Path(save_dir) if save_dir else None
        self.save_optim = save_optim
        self.save_rng = save_rng
        self.lora = lora
        self.async_save = async_save
        self.keep_latest = keep_latest
        self.print = print_fn or (lambda *a, **k: None)
        self.last_blocked_s = 0.0  # how long the last save() held the caller (the bench reads it)
        self.staging_wait_s = 0.0  # how long wait_staged() held the caller, in all
        self.written_s: dict[int, float] = {}  # step -> seconds its write took (async: in the background)
        self._pending: tuple[Future, Path] | None = None
        self._staged: Future | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._stager = None
        self._group = None
        if async_save and self.save_dir is not None:
            from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

            cuda = torch.cuda.is_available()
            self._stager = DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                                        use_async_staging=True, use_non_blocking_copy=cuda))
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmtune-ckpt-publish")
            if dist.is_initialized():  # the background save's collectives must not share the training group
                self._group = dist.new_group(backend="gloo", group_desc="async_checkpoint")
            else:  # the background thread's "assuming ... a single process" warning (_quiet is per call)
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)

    def save(self, step: int, model: nn.Module, optimizer=None, scheduler=None, loader=None,
             state: TrainState | None = None) -> Path:
        """Write <save>/iter_{step:07d} atomically, then the pointer (async: start it). Collective."""
        assert self.save_dir is not None, "save() without a save dir"
        t0 = time.perf_counter()
        self.wait()  # the previous save is complete and published before the next one starts
        rank, world = _rank_world()
        final = self.save_dir / iter_dir_name(step)
        tmp = self.save_dir / f".{final.name}.tmp"
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed while saving
                shutil.rmtree(tmp)
        _barrier()
        sd = self._state_dict(step, world, rank, model, optimizer, scheduler, loader, state or TrainState(step=step))
        if self.async_save:
            with _quiet():
                response = dcp.async_save(sd, storage_writer=dcp.FileSystemWriter(str(tmp)),
                                          async_stager=self._stager, process_group=self._group,
                                          no_dist=not dist.is_initialized())
            self._staged = response.staging_completion
            self._pending = (self._pool.submit(self._finish_async, response.upload_completion, step, tmp, final,
                                               time.perf_counter()), final)
        else:
            with _quiet():
                dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp)))
            _barrier()  # complete on every rank
            if rank == 0:
                self._publish(step, tmp, final)
            _barrier()
            self.written_s[step] = time.perf_counter() - t0
        self.last_blocked_s = time.perf_counter() - t0
        return final

    def _state_dict(self, step, world, rank, model, optimizer, scheduler, loader, state: TrainState) -> dict[str, Any]:
        sd: dict[str, Any] = {_MODEL_KEY: get_model_state_dict(model, options=_ADAPTERS if self.lora else None)}
        if self.lora is not None:
            sd[LORA_KEY] = self.lora
        if optimizer is not None and self.save_optim:
            sd[_OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
        sd["train_state"] = _to_bytes({
            "step": step, "consumed_samples": state.consumed_samples, "world_size": world,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "has_optim": _OPTIM_KEY in sd, "extra": state.extra,
        })
        per_rank: dict[str, Any] = {}
        if self.save_rng:
            per_rank["rng"] = rng_state()
        if loader is not None and hasattr(loader, "state_dict"):
            per_rank["dataloader"] = loader.state_dict()
        sd[f"rank_state.{rank}"] = _to_bytes(per_rank)
        return sd

    def _finish_async(self, written: Future, step: int, tmp: Path, final: Path, started: float) -> Path:
        """Background: wait for this rank's write; rank 0's finishes after every rank's (DCP gathers the
        write results before its .metadata), so rank 0 then publishes."""
        written.result()
        if _rank_world()[0] == 0:
            self._publish(step, tmp, final)
            self.print(f"saved checkpoint {final} (written in the background in {time.perf_counter() - started:.1f} s)",
                       flush=True)
        self.written_s[step] = time.perf_counter() - started
        return final

    def _publish(self, step: int, tmp: Path, final: Path) -> None:
        """Rank 0, once the write is complete everywhere: rename, move the pointer, prune old checkpoints."""
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_atomic(self.save_dir / POINTER_FILE, f"{step}\n")
        if self.keep_latest:
            prune_checkpoints(self.save_dir, self.keep_latest)

    def wait_staged(self) -> None:
        """Block until the save in flight has its copy of the state (call before changing the weights)."""
        if self._staged is not None:
            t0 = time.perf_counter()
            staged, self._staged = self._staged, None
            try:
                staged.result()
            finally:
                self.staging_wait_s += time.perf_counter() - t0

    def wait(self) -> None:
        """Block until the save in flight (if any) is written and published; raise if it failed."""
        self._staged = None  # the write waits for the copy: once written, it was staged
        if self._pending is not None:
            (pending, final), self._pending = self._pending, None
            try:
                pending.result()
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # DCP's CheckpointException derives from BaseException
                raise _save_failed(final, e) from e

    def close(self) -> None:
        """Wait for the save in flight and release the staging buffer and threads. Collective-free."""
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
                self._pool = None
            if self._stager is not None:
                self._stager.close()
                self._stager = None

    # ------------------------------------------------------------------------------------------ load

    @staticmethod
    def load_weights(path: str | Path, model: nn.Module) -> None:
        """A converted weights-only DCP (plain native names) into a (sharded) model."""
        keys = checkpoint_keys(path)
        sd = {k: v for k, v in get_model_state_dict(model).items() if not is_adapter_name(k)}  # base weights
        missing = sorted(k for k in sd if k not in keys)
        if missing:
            raise ValueError(f"{path}: the DCP lacks {len(missing)} model tensors, e.g. {missing[:3]} — "
                             "was it converted from a checkpoint of this model (config.json)?")
        _check_shapes(path, sd, prefix="")
        with _quiet():
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)))
        set_model_state_dict(model, sd, options=StateDictOptions(strict=False))

    @staticmethod
    def load_adapters(path: str | Path, model: nn.Module) -> None:
        """The adapters of a LoRA training checkpoint (`--lora-load`) into a model with the same adapters;
        nothing else (step 0, fresh optimizer). ValueError when they do not fit this model."""
        path = Path(path)
        keys = checkpoint_keys(path)
        sd = get_model_state_dict(model, options=_ADAPTERS)
        missing = sorted(k for k in sd if MODEL_PREFIX + k not in keys)
        if missing:
            raise ValueError(f"--lora-load {path}: the adapter lacks {len(missing)} of this run's adapter tensors, "
                             f"e.g. {missing[:2]} — it was trained with other --lora-target-modules or for another model")
        # ... and every adapter it holds has its place here: one left behind would make this run's model
        # another than the adapter's (e.g. vision adapters loaded into a run that freezes the vision tower)
        extra = sorted(k[len(MODEL_PREFIX):] for k in keys
                       if k.startswith(MODEL_PREFIX) and is_adapter_name(k) and k[len(MODEL_PREFIX):] not in sd)
        if extra:
            raise ValueError(f"--lora-load {path}: the adapter has {len(extra)} adapter tensors this run has no "
                             f"place for, e.g. {extra[:2]} — it was trained with other --lora-target-modules or "
                             "freeze flags (model.json), or for another model; the rest alone is not its model")
        _check_shapes(path, sd, prefix=MODEL_PREFIX, what="--lora-load: the adapter")
        with _quiet():
            dcp.load({_MODEL_KEY: sd}, storage_reader=dcp.FileSystemReader(str(path)))
        set_model_state_dict(model, sd, options=_ADAPTERS)

    @staticmethod
    def load(path: str | Path, model: nn.Module, optimizer=None, scheduler=None, loader=None, *,
             load_optim: bool = True, load_rng: bool = True) -> TrainState:
        """Resume from a training checkpoint directory (iter_XXXXXXX). Collective."""
        path = Path(path)
        rank, world = _rank_world()
        keys = checkpoint_keys(path)
        train = _from_bytes(_load_bytes(path, "train_state"))
        lora = LORA_KEY in keys  # adapters only: the base weights are already in the model
        model_sd = get_model_state_dict(model, options=_ADAPTERS if lora else None)
        if lora and not model_sd:
            raise ValueError(f"{path} is a LoRA checkpoint (adapters only) but this model has no adapters: "
                             "resume it with the same --lora-* flags")
        missing = sorted(k for k in model_sd if MODEL_PREFIX + k not in keys)
        if missing:
            raise ValueError(f"{path}: the checkpoint lacks {len(missing)} model tensors, e.g. {missing[:3]} "
                             "— it was saved from another model" + (" or with other --lora-* flags" if lora else ""))
        _check_shapes(path, model_sd, prefix=MODEL_PREFIX)
        sd: dict[str, Any] = {_MODEL_KEY: model_sd}
        want_optim = optimizer is not None and load_optim
        if want_optim:
            if not train.get("has_optim"):
                raise ValueError(f"{path} holds no optimizer state (saved with --no-save-optim): "
                                 "pass --no-load-optim to start a fresh optimizer")
            sd[_OPTIM_KEY] = get_optimizer_state_dict(model, optimizer)
        with _quiet():
            dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)))
        set_model_state_dict(model, sd[_MODEL_KEY], options=_ADAPTERS if lora else None)
        # the optimizer's moments and the schedule's position come from the checkpoint, its settings from this
        # run's flags (the fresh optimizer and scheduler hold them): a resume with a lower --lr uses it
        changed: dict[str, tuple[Any, Any]] = {}
        if want_optim:
            fresh = [{k: g[k] for k in _OPTIM_SETTINGS} for g in optimizer.param_groups]
            set_optimizer_state_dict(model, optimizer, sd[_OPTIM_KEY])
            for group, settings in zip(optimizer.param_groups, fresh):
                for k, v in settings.items():
                    if _setting(group[k]) != _setting(v):
                        changed[k] = (_setting(group[k]), _setting(v))
                    group[k] = v
        step = int(train["step"])
        if scheduler is not None:
            base_lrs = list(scheduler.base_lrs)
            if want_optim and train.get("scheduler") is not None:
                scheduler.load_state_dict(train["scheduler"])
                if list(scheduler.base_lrs) != base_lrs:
                    changed["lr"] = (max(scheduler.base_lrs), max(base_lrs))
                scheduler.base_lrs = base_lrs
                for group, lr in zip(optimizer.param_groups, base_lrs):
                    group["initial_lr"] = lr
            fast_forward_scheduler(scheduler, step)  # the rate at `step` from this run's schedule
        same_world = int(train.get("world_size", 1)) == world
        rank_key = f"rank_state.{rank}"
        per_rank = _from_bytes(_load_bytes(path, rank_key)) if same_world and rank_key in keys else {}
        if load_rng and "rng" in per_rank:
            set_rng_state(per_rank["rng"])
        restored_loader = False
        if loader is not None and "dataloader" in per_rank:
            loader.load_state_dict(per_rank["dataloader"])
            restored_loader = True
        extra = dict(train.get("extra") or {})
        extra["restored_loader"] = restored_loader
        extra["settings_changed"] = changed  # {optimizer setting: (checkpoint's, this run's)}
        extra["saved_world_size"] = int(train.get("world_size", 1))
        return TrainState(step=step, consumed_samples=int(train.get("consumed_samples", 0)), extra=extra)


@contextlib.contextmanager
def _quiet():
    """DCP warns "torch.distributed is disabled ... assuming the intent is to save/load in a single
    process" for every one-process call: that is the intent, so the warning is noise here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)
        yield


def _load_bytes(path: Path, key: str) -> bytes:
    """One opaque blob from a DCP checkpoint (every rank reads it; no collective needed)."""
    sd = {key: b""}
    with _quiet():
        dcp.load(sd, storage_reader=dcp.FileSystemReader(str(path)), no_dist=True)
    return sd[key]


def _check_shapes(path: Path, model_sd: dict[str, Any], prefix: str, what: str = "") -> None:
    meta = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    for name, tensor in model_sd.items():
        saved = meta[prefix + name]
        size = getattr(saved, "size", None)
        if size is not None and tuple(size) != tuple(tensor.shape):
            raise ValueError(f"{what or path}: tensor {prefix + name} has shape {tuple(size)}, the model expects "
                             f"{tuple(tensor.shape)} — the checkpoint belongs to another model config"
                             + (f" ({path})" if what else ""))


_OPTIM_SETTINGS = ("weight_decay", "betas", "eps")  # AdamW's, besides the learning rate (the scheduler's)


def _setting(value):
    return tuple(value) if isinstance(value, (list, tuple)) else value


def fast_forward_scheduler(scheduler, step: int) -> None:
    """Put an LR scheduler at `step` without its saved state (the schedule is a function of the step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.last_epoch = step - 1
        scheduler.step()


class CheckpointSaveError(RuntimeError):
    """A background (--async-save) write failed; the previous checkpoint stays the latest."""


def _save_failed(final: Path, e: BaseException) -> CheckpointSaveError:
    last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    return CheckpointSaveError(f"checkpoint {final} was not written (background save failed; the previous checkpoint "
                        f"stays the latest): {last}")


def prune_checkpoints(save_dir: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete `iter_XXXXXXX` dirs, never the one the pointer names
    (`.iter_XXXXXXX.tmp` ones being written do not match). Rank 0 only. Returns the deleted dirs."""
    pointed = latest_checkpoint(save_dir)
    complete = sorted((p for p in save_dir.iterdir() if _ITER_RE.match(p.name) and p.is_dir()),
                      key=lambda p: int(p.name[5:]))
    doomed = [p for p in complete[:-keep] if pointed is None or p.resolve() != pointed.resolve()]
    for p in doomed:
        # rename first so a crash mid-delete never leaves a half-deleted dir under a checkpoint's name
        trash = p.with_name(f".{p.name}.deleting")
        if trash.exists():  # left by a run killed while deleting
            shutil.rmtree(trash)
        os.replace(p, trash)
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def peek_lora(path: str | Path) -> bytes | None:
    """The `lora` blob of a checkpoint (train/lora.read_metadata decodes it), None for a full checkpoint."""
    return _load_bytes(Path(path), LORA_KEY) if LORA_KEY in checkpoint_keys(path) else None


def peek_train_state(path: str | Path) -> dict[str, Any]:
    """The small train_state blob of a training checkpoint (step, consumed samples, world size, ...)."""
    return _from_bytes(_load_bytes(Path(path), "train_state"))
