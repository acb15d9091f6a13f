"""An HF model dir (config.json + safetensors, hub or merged expert layout) straight into the sharded model.

Each rank reads only the slices of the tensors it holds; nothing is converted or written first.

How: `torch.distributed.checkpoint.load` (DCP) does the resharding arithmetic. `HFSliceReader` presents the
HF dir to DCP as a checkpoint whose tensors carry the model's native names: a tensor stored under its
native name is one stored chunk; a stacked expert tensor (`...mlp.experts.gate_up_proj` [E, 2I, H]) is
2E stored chunks, one per hub tensor (`...experts.{e}.gate_proj.weight` at [e, 0:I, :], `up_proj` at
[e, I:2I, :]), placed by the model's `StateDictAdapter.hub_slices` — the one definition of the expert
split, shared with conversion. DCP intersects each rank's local piece of every parameter (computed from
the DTensor's own device mesh and placements: FSDP, HSDP, an expert-parallel Shard(0), a _StridedShard,
whatever the parallelisms made) with those chunks and asks the reader for exactly the overlapping
regions; the reader takes them from the safetensors files with plain reads of the rows they cover
(`weights.safetensors_io.read_region`; no mmap, so nothing of the files stays mapped into the process). A rank
therefore holds its shard plus one region in flight, never a full expert stack.

torch's own `HuggingFaceStorageReader` reads safetensors slices too (through mmap) but maps tensor names
one to one, so it cannot assemble a stacked expert tensor from 2E hub tensors; hence this reader.

Every check happens before any data moves (`HFIndex.build`): a missing or corrupt shard (weights/hf_files
`list_shards`), a tensor the model needs that the dir lacks, a shape that disagrees with the model — each
raised naming the file and tensor. MTP layers and tensors the model does not know are never read.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future
from tqdm import tqdm

from mmtune.ops.lora import is_adapter_name
from mmtune.weights.hf_files import list_shards
from mmtune.weights.safetensors_io import TensorEntry, read_region


def is_hf_dir(path: str | Path) -> bool:
    """An HF model dir: config.json next to safetensors weights (an index or a single model.safetensors)."""
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file())


@dataclass(frozen=True)
class _Piece:
    """One stored chunk: the region `offsets`/`sizes` of a native tensor is hub tensor `entry` of `file`;
    `dropped` are the region's dims of size 1 that the hub tensor does not have (an expert index)."""

    file: Path
    entry: TensorEntry
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dropped: tuple[int, ...]


class HFIndex:
    """Native name -> the stored chunks that make it up, for the tensors a model needs; checked."""

    def __init__(self, root: Path, pieces: dict[str, list[_Piece]], dtypes: dict[str, torch.dtype],
                 shapes: dict[str, tuple[int, ...]]):
        self.root, self.pieces, self.dtypes, self.shapes = root, pieces, dtypes, shapes

    @classmethod
    def build(cls, hf_dir: str | Path, wanted: dict[str, tuple[int, ...]], adapter) -> "HFIndex":
        """wanted: native name -> shape (the model's state dict); adapter: the model's StateDictAdapter."""
        root = Path(hf_dir)
        stored: dict[str, tuple[Path, TensorEntry]] = {}
        for shard in list_shards(root):  # headers read and checked; a missing/truncated shard is named
            for e in shard.entries:
                stored[e.name] = (shard.path, e)
        pieces: dict[str, list[_Piece]] = {}
        dtypes: dict[str, torch.dtype] = {}
        missing: list[str] = []
        for name, shape in wanted.items():
            shape = tuple(shape)
            if name in stored:  # merged layout, or a tensor named alike in both layouts
                parts = [(name, ())]
            else:
                parts = adapter.hub_slices(name, shape)
            chunks = []
            for hub, index in parts:
                if hub not in stored:
                    missing.append(hub)
                    continue
                file, entry = stored[hub]
                offsets, sizes, dropped = _region(index, shape)
                expect = tuple(s for d, s in enumerate(sizes) if d not in dropped)
                if tuple(entry.shape) != expect:
                    raise ValueError(f"{file}: tensor {hub} has shape {tuple(entry.shape)}, the model expects {expect} "
                                     f"(for {name} {shape}) — the weights belong to another config.json")
                chunks.append(_Piece(file, entry, offsets, sizes, dropped))
                dtypes.setdefault(name, entry.dtype)
            if chunks and len(chunks) == len(parts):
                covered = sum(math.prod(c.sizes) for c in chunks)
                assert covered == math.prod(shape), (name, covered, shape)  # hub_slices tiles the tensor
                pieces[name] = chunks
        if missing:
            shown = ", ".join(missing[:6]) + (f", ... ({len(missing)} in all)" if len(missing) > 6 else "")
            raise ValueError(f"{root}: the weights lack {len(missing)} tensor(s) the model needs: {shown}")
        return cls(root, pieces, dtypes, {k: tuple(v) for k, v in wanted.items()})

    def metadata(self) -> Metadata:
        md: dict[str, Any] = {}
        for name, chunks in self.pieces.items():
            md[name] = TensorStorageMetadata(
                properties=TensorProperties(dtype=self.dtypes[name]), size=torch.Size(self.shapes[name]),
                chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)) for c in chunks])
        return Metadata(state_dict_metadata=md)


def _region(index: tuple[int | slice, ...], shape: tuple[int, ...]):
    """(offsets, sizes, dims indexed by an int) of `native[index]` inside a tensor of `shape`."""
    offsets, sizes, dropped = [], [], []
    for d, n in enumerate(shape):
        i = index[d] if d < len(index) else slice(None)
        if isinstance(i, int):
            offsets.append(i)
            sizes.append(1)
            dropped.append(d)
        else:
            start, stop, step = i.indices(n)
            assert step == 1, f"hub slice with a step: {index}"
            offsets.append(start)
            sizes.append(stop - start)
    return tuple(offsets), tuple(sizes), tuple(dropped)


class HFSliceReader(StorageReader):
    """A DCP StorageReader over an `HFIndex` (see the module docstring)."""

    def __init__(self, index: HFIndex, progress: bool = False):
        super().__init__()
        self.index = index
        self.progress = progress
        self._by_chunk = {(name, c.offsets): c for name, chunks in index.pieces.items() for c in chunks}
        self.bytes_read = 0

    def reset(self, checkpoint_id=None) -> None:
        pass

    def read_metadata(self, *args, **kwargs) -> Metadata:
        return self.index.metadata()

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kwargs) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        by_file: dict[Path, list] = {}
        for item in plan.items:
            piece = self._by_chunk[(item.storage_index.fqn, tuple(item.storage_index.offset))]
            by_file.setdefault(piece.file, []).append((item, piece))
        bar = tqdm(total=len(plan.items), unit="tensor", desc="load HF weights (rank 0's part)",
                   disable=not self.progress)
        for file, items in sorted(by_file.items()):
            with open(file, "rb", buffering=0) as f:
                for item, piece in sorted(items, key=lambda x: x[1].entry.begin):  # in file order
                    region = [slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths)]
                    hub_index = tuple(s for d, s in enumerate(region) if d not in piece.dropped)
                    data = read_region(f, piece.entry, hub_index)
                    target = planner.resolve_tensor(item).detach()
                    target.copy_(data.reshape(target.shape))  # casts (bf16 file -> fp32 master weights)
                    planner.commit_tensor(item, target)
                    self.bytes_read += data.untyped_storage().nbytes()  # the rows read from the file
                    bar.update()
        bar.close()
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut


def load_hf_weights(hf_dir: str | Path, model: nn.Module, adapter, progress: bool = False) -> int:
    """Load an HF dir into a (meta-initialised, sharded, materialised) model, each rank its own part.
    Collective when a process group exists. Returns the bytes this rank read. LoRA adapters (not part of
    an HF base model) are left as they are; the caller initialises them."""
    full = get_model_state_dict(model)
    sd = {k: v for k, v in full.items() if not is_adapter_name(k)}
    index = HFIndex.build(hf_dir, {k: tuple(v.shape) for k, v in sd.items()}, adapter)
    reader = HFSliceReader(index, progress=progress)
    import torch.distributed as dist

    with warnings.catch_warnings():  # one process: "assuming the intent is to load in a single process"
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*", category=UserWarning)
        dcp.load(sd, storage_reader=reader, no_dist=not dist.is_initialized())
    set_model_state_dict(model, sd, options=StateDictOptions(strict=len(sd) == len(full)))
    return reader.bytes_read
