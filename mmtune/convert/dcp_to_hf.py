"""DCP checkpoint (converted or training) -> HF dir in hub layout, streaming tensor by tensor.

The output is planned from the DCP metadata alone (names, shapes, dtypes -> hub tensors -> shards of at
most `max_shard_size`), so each safetensors header is written first and the tensors follow as they are
read: a batch of at most `piece_bytes` native tensors is in memory at a time (or one larger tensor).
Tensors of the original HF dir that the checkpoint lacks and the model does not know (the MTP layer,
extras, e.g. after training, which never sees them) are copied from the original dir, so nothing is lost.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from mmtune.convert.dcp_io import load_tensors, model_tensors, read_metadata, resolve_dcp_dir
from mmtune.convert.lora_export import lora_info, merged_export
from mmtune.weights.hf_files import (INDEX_FILE, SINGLE_FILE, copy_non_weight_files, list_shards, staged_output,
                                     write_weight_files)
from mmtune.weights.safetensors_io import TensorEntry, iter_tensors
from mmtune.models import load_config

DEFAULT_PIECE_BYTES = 256 * 2**20
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}  # fmt: skip


def parse_size(text: str | int) -> int:
    """'4GB' -> 4e9, '500MiB' -> 500 * 2**20, 1000 -> 1000 (as transformers' max_shard_size)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise ValueError(f"--max-shard-size {text!r}: expected a size like 4GB, 500MB or 2GiB")
    return int(float(m[1]) * _UNITS[m[2].upper()])


@dataclass
class _Source:
    """One native tensor of the DCP, or one tensor copied from the original HF dir."""

    native: str | None = None
    key: str | None = None
    meta: object = None
    hf_path: Path | None = None
    hf_entry: TensorEntry | None = None
    nbytes: int = 0


def dcp_to_hf(hf_dir: str | Path, dcp_dir: str | Path, save_dir: str | Path, *, max_shard_size: str | int = "4GB",
              force: bool = False, dtype: str = "keep", piece_bytes: int = DEFAULT_PIECE_BYTES,
              progress: bool = True) -> Path:
    """Export the model weights of `dcp_dir` to an HF dir at `save_dir` (hub layout, sharded with an index
    json, every non-weight file of `hf_dir` copied). `dtype`: "keep" the checkpoint's dtypes, or "hf" to
    cast each tensor to the dtype it has in `hf_dir`'s weights (e.g. fp32 training weights back to bf16).
    A LoRA checkpoint (adapters only) is merged into `hf_dir`'s weights (convert/lora_export.py)."""
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    if dtype not in ("keep", "hf"):
        raise ValueError(f"--dtype {dtype!r}: expected 'keep' or 'hf'")
    max_bytes = parse_size(max_shard_size)
    ckpt = resolve_dcp_dir(dcp_dir)
    lora = lora_info(ckpt)
    if lora is not None:  # adapters only: merged into the base weights of hf_dir
        return merged_export(hf_dir, ckpt, save_dir, lora, dtype=dtype, force=force, progress=progress)
    arch, config = load_config(hf_dir)
    adapter = arch.adapter_class(config)
    tensors = model_tensors(read_metadata(ckpt))
    if not tensors:
        raise ValueError(f"{ckpt}: the checkpoint holds no model tensors")
    for name, want in adapter.shapes.items():
        if name not in tensors:
            raise ValueError(f"{ckpt}: model tensor {name} is missing from the checkpoint (config {hf_dir}/config.json)")
        got = tuple(tensors[name][1].size)
        if got != want:
            raise ValueError(f"{ckpt}: tensor {name} has shape {got} but {hf_dir}/config.json expects {want}")

    hf_shards = list_shards(hf_dir) if (hf_dir / INDEX_FILE).exists() or (hf_dir / SINGLE_FILE).exists() else []
    hf_dtypes = {e.name: e.dtype for s in hf_shards for e in s.entries}
    sources = [_Source(native=n, key=k, meta=md, nbytes=md.properties.dtype.itemsize * _numel(md.size))
               for n, (k, md) in tensors.items()]
    for shard in hf_shards:  # what the checkpoint lacks and the model does not know: MTP, extras
        for e in shard.entries:
            if e.name not in tensors and not adapter.knows_hub_name(e.name):
                sources.append(_Source(hf_path=shard.path, hf_entry=e, nbytes=e.nbytes))

    # plan hub tensors -> shards
    def out_dtype(hub_name: str, d: torch.dtype) -> torch.dtype:
        return hf_dtypes.get(hub_name, d) if dtype == "hf" else d

    plan: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    for s in sources:
        if s.native is not None:
            d = s.meta.properties.dtype
            plan += [(n, out_dtype(n, d), shp) for n, shp in adapter.hub_names_and_shapes(s.native, tuple(s.meta.size))]
        else:
            plan.append((s.hf_entry.name, out_dtype(s.hf_entry.name, s.hf_entry.dtype), s.hf_entry.shape))
    shards: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    size = 0
    for item in plan:
        n = item[1].itemsize * _numel(item[2])
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += n

    total = sum(t[1].itemsize * _numel(t[2]) for t in plan)
    with staged_output(save_dir, force, protect=[hf_dir, ckpt]) as tmp:
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="dcp-to-hf", disable=not progress)
        stream = _hub_stream(ckpt, sources, adapter, dict((n, d) for n, d, _ in plan), piece_bytes, bar, len(plan))
        names = (
            [SINGLE_FILE] if len(shards) == 1
            else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        )
        write_weight_files(tmp, ((file, shard, stream) for file, shard in zip(names, shards)), index=len(shards) > 1)
        bar.close()
        copy_non_weight_files(hf_dir, tmp)
    return save_dir


def _hub_stream(ckpt: Path, sources: list[_Source], adapter, dtypes: dict[str, torch.dtype],
                piece_bytes: int, bar, n_total: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Hub (name, tensor) in plan order: DCP tensors loaded in batches of <= piece_bytes, split by to_hub."""
    done = 0

    def emit(name, tensor):
        nonlocal done
        tensor = tensor.to(dtypes[name])
        done += 1
        bar.update(tensor.nbytes)
        bar.set_postfix_str(f"{done}/{n_total} tensors")
        return name, tensor

    # group the sources into jobs: one original-HF tensor, or a batch of DCP tensors (<= piece_bytes)
    jobs: list[_Source | list[_Source]] = []
    i = 0
    while i < len(sources):
        if sources[i].native is None:
            jobs.append(sources[i])
            i += 1
            continue
        batch, size = [], 0
        while i < len(sources) and sources[i].native is not None and (not batch or size + sources[i].nbytes <= piece_bytes):
            batch.append(sources[i])
            size += sources[i].nbytes
            i += 1
        jobs.append(batch)

    def load(batch: list[_Source]) -> dict[str, torch.Tensor]:
        return load_tensors(ckpt, {b.key: b.meta for b in batch})

    # the next DCP batch is read on a background thread while the current one is split and written
    # (at most two batches in memory)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dcp-read") as pool:
        batches = [j for j in jobs if isinstance(j, list)]
        ahead = {0: pool.submit(load, batches[0])} if batches else {}
        k = 0
        for job in jobs:
            if not isinstance(job, list):
                for name, tensor in iter_tensors(job.hf_path, [job.hf_entry]):
                    yield emit(name, tensor)
                continue
            loaded = ahead.pop(k).result()
            if k + 1 < len(batches):
                ahead[k + 1] = pool.submit(load, batches[k + 1])
            k += 1
            for b in job:
                tensor = loaded.pop(b.key)
                for name, part in adapter.to_hub(b.native, tensor):
                    yield emit(name, part)
                del tensor


def _numel(size) -> int:
    n = 1
    for s in size:
        n *= int(s)
    return n
