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

Atomicity: every rank writes into `<save>/.iter_XXXXXXX.tmp`; after a barrier rank 0 renames it to
`iter_XXXXXXX` and then replaces the pointer file via a temporary file + os.replace. A process killed at any
moment leaves the previous checkpoint and a pointer to a complete checkpoint.

The opaque byte blobs are serialised with torch.save and read back with torch.load(weights_only=True).
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import warnings
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

    kind: str  # "training" (resume) | "weights" (converted DCP: step 0)
    path: Path  # the DCP directory
    step: int = 0


def resolve_load_path(path: str | Path) -> LoadSource:
    """A save dir with the pointer file, an iter_XXXXXXX dir, or a converted weights-only DCP dir."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--load {path}: no such directory (expected a save dir with {POINTER_FILE}, "
                                "an iter_XXXXXXX checkpoint or a DCP from `mmtune convert hf-to-dcp`)")
    if (path / POINTER_FILE).is_file():
        ckpt = resolve_dcp_dir(path)  # reads and checks the pointer (the contract shared with convert)
        return LoadSource("training", ckpt, int(ckpt.name.split("_")[-1]))
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"--load {path}: neither {POINTER_FILE} nor a DCP .metadata file is there")
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata.keys()
    if "train_state" in keys:
        step = int(path.name.split("_")[-1]) if path.name.startswith("iter_") else 0
        return LoadSource("training", path, step)
    return LoadSource("weights", path, 0)


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
    """Saves and loads model, optimizer, scheduler, RNG and data-loader state under one save dir."""

    def __init__(self, save_dir: str | Path | None, *, save_optim: bool = True, save_rng: bool = True,
                 lora: bytes | None = None):
        """lora: a LoRA run's metadata blob (train/lora.metadata): checkpoints then hold only the adapters."""
        self.save_dir = Path(save_dir) if save_dir else None
        self.save_optim = save_optim
        self.save_rng = save_rng
        self.lora = lora

    def save(self, step: int, model: nn.Module, optimizer=None, scheduler=None, loader=None,
             state: TrainState | None = None) -> Path:
        """Write <save>/iter_{step:07d} atomically, then the pointer. Collective: every rank calls it."""
        assert self.save_dir is not None, "save() without a save dir"
        rank, world = _rank_world()
        final = self.save_dir / iter_dir_name(step)
        tmp = self.save_dir / f".{final.name}.tmp"
        if rank == 0:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            if tmp.exists():  # left by a run killed while saving
                shutil.rmtree(tmp)
        _barrier()
        state = state or TrainState(step=step)
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
        with _quiet():
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(str(tmp)))
        _barrier()
        if rank == 0:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(self.save_dir / POINTER_FILE, f"{step}\n")
        _barrier()
        return final

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
        if want_optim:
            set_optimizer_state_dict(model, optimizer, sd[_OPTIM_KEY])
        step = int(train["step"])
        if scheduler is not None:
            if want_optim and train.get("scheduler") is not None:
                scheduler.load_state_dict(train["scheduler"])
            else:
                fast_forward_scheduler(scheduler, step)
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


def fast_forward_scheduler(scheduler, step: int) -> None:
    """Put an LR scheduler at `step` without its saved state (the schedule is a function of the step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler.last_epoch = step - 1
        scheduler.step()


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
