"""Streaming safetensors: read one tensor at a time with checks, write a file tensor by tensor.

Format (huggingface/safetensors): 8-byte little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the data,
offsets relative to the end of the header. Reading with `readinto` (no mmap) keeps resident memory at
one tensor (or at the rows of one that `read_region` asks for); writing from a plan (names, dtypes, shapes known up front) lets the header go first and the
tensors follow one by one, so a whole shard never sits in memory.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100_000_000


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute file offset of the first byte
    nbytes: int


def read_header(path: str | Path) -> list[TensorEntry]:
    """The tensors of a safetensors file in storage order; ValueError naming the file (and tensor) when
    the file is truncated or its header is corrupt."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, _MAX_HEADER):
            raise ValueError(f"{path}: corrupt or truncated safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(s) for s in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name}: corrupt header entry {info!r} ({e!r})") from e
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise ValueError(f"{path}: tensor {name}: data_offsets {begin}..{end} do not hold {info['dtype']} {list(shape)}")
        if 8 + n + end > size:
            raise ValueError(
                f"{path}: tensor {name}: data ends at byte {8 + n + end} but the file has {size} bytes "
                "(truncated file: download or copy it again)"
            )
        entries.append(TensorEntry(name, dtype, shape, 8 + n + begin, nbytes))
    entries.sort(key=lambda e: e.begin)
    return entries


def iter_tensors(path: str | Path, entries: Iterable[TensorEntry] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) of a file (or of the given entries of it), each freshly read into memory."""
    path = Path(path)
    entries = read_header(path) if entries is None else entries
    with open(path, "rb", buffering=0) as f:
        for e in entries:
            yield e.name, read_region(f, e, ())


def read_region(f, entry: TensorEntry, index: tuple[slice, ...]) -> torch.Tensor:
    """`tensor[index]` of one tensor of the open (unbuffered, binary) file `f`, reading only the rows of dim 0
    that `index` covers (one contiguous byte range); further dims are cut in memory, so at most those whole
    rows are held (exact for FSDP's and expert parallelism's dim-0 shards; a shard of a later dim reads whole
    rows). `index`: step-1 slices for the leading dims (missing ones are whole)."""
    shape = entry.shape
    if not shape:
        return _read_bytes(f, entry, entry.begin, entry.nbytes).view(entry.dtype).reshape(())
    rows = index[0].indices(shape[0]) if index else (0, shape[0], 1)
    assert rows[2] == 1, f"a strided read of {entry.name}"
    start, stop = rows[0], max(rows[0], rows[1])
    row_bytes = entry.nbytes // shape[0] if shape[0] else 0
    data = _read_bytes(f, entry, entry.begin + start * row_bytes, (stop - start) * row_bytes)
    block = data.view(entry.dtype).reshape((stop - start, *shape[1:]))
    return block[(slice(None), *index[1:])] if len(index) > 1 else block


def _read_bytes(f, entry: TensorEntry, pos: int, n: int) -> torch.Tensor:
    buf = torch.empty(n, dtype=torch.uint8)
    f.seek(pos)
    view = memoryview(buf.numpy())
    got = 0
    while got < n:
        k = f.readinto(view[got:])
        if not k:
            raise ValueError(f"{getattr(f, 'name', 'file')}: tensor {entry.name}: file ended while reading (truncated)")
        got += k
    return buf


def write_file(path: str | Path, plan: list[tuple[str, torch.dtype, tuple[int, ...]]], tensors: Iterator[tuple[str, torch.Tensor]],
               metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file whose tensors are `plan` (in order), taking the data from `tensors`, which
    must yield the planned names in the same order. Returns the number of data bytes."""
    header: dict = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for name, dtype, shape in plan:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, dtype, shape in plan:
            got_name, t = next(tensors)
            assert got_name == name and t.dtype == dtype and tuple(t.shape) == tuple(shape), (got_name, name)
            f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        os.fsync(f.fileno())
    return offset
