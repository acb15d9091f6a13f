"""torch.distributed.checkpoint (DCP) pieces for streaming conversion, and where a model lives in a DCP.

Key layout (the contract with the trainer, docs/INTERNALS.md "Checkpoint key layout"):
- a converted weights-only DCP (`mmtune convert hf-to-dcp`) stores plain native names
  (`model.visual...`, `lm_head.weight`);
- a training checkpoint `<save>/iter_XXXXXXX` stores the model under `MODEL_PREFIX` + native name and
  the optimizer under `OPTIM_PREFIX` (what `dcp.save({"model": model_sd, "optim": optim_sd})` gives).

Streaming write: one `dcp.save` cannot be fed incrementally, so `PieceWriter` saves each bounded piece
of the state dict with the public `dcp.save` into its own sub-directory `part_XXXXX/` of the checkpoint,
then `finish()` reads every part's metadata, re-points each item's storage at `part_XXXXX/<file>` and
writes one global `.metadata` with `FileSystemWriter.finish` (the same call dcp.save ends with). The
result is one ordinary DCP checkpoint that `dcp.load(..., checkpoint_id=dir)` reads, on any number of
ranks; memory is bounded by a piece.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.storage import WriteResult

MODEL_PREFIX = "model."
OPTIM_PREFIX = "optim."
LORA_KEY = "lora"  # a LoRA training checkpoint's metadata blob (JSON bytes; train/checkpoint.py writes it)
LATEST_FILE = "latest_checkpointed_iteration.txt"
METADATA_FILE = ".metadata"


def resolve_dcp_dir(path: str | Path) -> Path:
    """A DCP checkpoint dir from: a checkpoint dir itself (has .metadata), or a save dir with
    latest_checkpointed_iteration.txt (then its latest iter_XXXXXXX)."""
    path = Path(path)
    if (path / METADATA_FILE).is_file():
        return path
    latest = path / LATEST_FILE
    if latest.is_file():
        text = latest.read_text().strip()
        if not text.isdigit():
            raise ValueError(f"{latest}: expected an iteration number, found {text!r}")
        it = path / f"iter_{int(text):07d}"
        if not (it / METADATA_FILE).is_file():
            raise FileNotFoundError(f"{latest} names iteration {int(text)} but {it}/{METADATA_FILE} does not exist")
        return it
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such DCP checkpoint dir")
    raise FileNotFoundError(
        f"{path}: not a DCP checkpoint (no {METADATA_FILE}) and not a save dir (no {LATEST_FILE}); "
        "pass a converted dir, a training checkpoint iter_XXXXXXX, or the training --save dir"
    )


def read_metadata(ckpt: Path) -> Metadata:
    try:
        return FileSystemReader(str(ckpt)).read_metadata()
    except Exception as e:  # pickle errors, truncated file, ...
        raise ValueError(f"{ckpt / METADATA_FILE}: unreadable DCP metadata ({e!r})") from e


def model_prefix(metadata: Metadata) -> str:
    """"" for a converted weights-only DCP, MODEL_PREFIX for a training checkpoint."""
    native_roots = ("model.", "lm_head.")
    if any(k.startswith(MODEL_PREFIX + r) for k in metadata.state_dict_metadata for r in native_roots):
        return MODEL_PREFIX
    return ""


def model_tensors(metadata: Metadata) -> dict[str, tuple[str, TensorStorageMetadata]]:
    """native name -> (DCP key, tensor metadata) of the model weights in a checkpoint, in stored order."""
    prefix = model_prefix(metadata)
    out = {}
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, TensorStorageMetadata) and key.startswith(prefix):
            if prefix == "" and key.startswith(OPTIM_PREFIX):
                continue
            out[key[len(prefix):]] = (key, md)
    return out


def load_tensors(ckpt: Path, wanted: dict[str, TensorStorageMetadata]) -> dict[str, torch.Tensor]:
    """Read the named full tensors from a DCP checkpoint (any sharding it was saved with)."""
    sd = {k: torch.empty(tuple(md.size), dtype=md.properties.dtype) for k, md in wanted.items()}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return sd


def load_blob(ckpt: Path, key: str) -> bytes:
    """One non-tensor item (a bytes blob) of a DCP checkpoint, read in this process alone."""
    sd = {key: b""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(sd, storage_reader=FileSystemReader(str(ckpt)), no_dist=True)
    return sd[key]


class PieceWriter:
    """Writes one DCP checkpoint into `root` from several bounded state-dict pieces (see module doc).

    Each piece is saved on a background thread while the caller assembles the next one (reading and
    merging overlap with writing); at most one piece is being written at a time, so memory stays
    bounded by two pieces. An error in a write is raised by the next `write` or by `finish`."""

    def __init__(self, root: Path):
        self.root = root
        self.parts: list[str] = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcp-piece")
        self._pending: Future | None = None

    def write(self, piece: dict[str, torch.Tensor]) -> None:
        if not piece:
            return
        self._wait()
        part = f"part_{len(self.parts):05d}"
        self.parts.append(part)
        self._pending = self._pool.submit(self._save, piece, self.root / part)

    @staticmethod
    def _save(piece: dict[str, torch.Tensor], where: Path) -> None:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.save(piece, storage_writer=FileSystemWriter(str(where), thread_count=2), no_dist=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        """Wait for the piece in flight (its error, if any, is dropped: the caller is already failing)."""
        try:
            self._wait()
        except Exception:
            pass
        self._pool.shutdown(wait=True)

    def finish(self) -> Metadata:
        self._wait()
        self._pool.shutdown(wait=True)
        merged = Metadata(state_dict_metadata={}, planner_data={})
        results = []
        for part in self.parts:
            md = FileSystemReader(str(self.root / part)).read_metadata()
            overlap = merged.state_dict_metadata.keys() & md.state_dict_metadata.keys()
            assert not overlap, overlap
            merged.state_dict_metadata.update(md.state_dict_metadata)
            if isinstance(md.planner_data, dict):
                merged.planner_data.update(md.planner_data)
            for index, info in md.storage_data.items():
                info = dataclasses.replace(info, relative_path=f"{part}/{info.relative_path}")
                results.append(WriteResult(index=index, size_in_bytes=info.length, storage_data=info))
            os.remove(self.root / part / METADATA_FILE)
        writer = FileSystemWriter(str(self.root))
        writer.set_up_storage_writer(True, rank=0, use_collectives=True)
        writer.finish(merged, [results])
        return merged
