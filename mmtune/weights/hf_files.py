"""An HF model dir's weight files (checked before anything is converted) and the staged output dir."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from mmtune.weights.safetensors_io import TensorEntry, read_header, write_file

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".distcp", ".safetensors.index.json", ".bin.index.json")


@dataclass
class Shard:
    path: Path
    entries: list[TensorEntry]  # in storage order

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def list_shards(hf_dir: str | Path) -> list[Shard]:
    """The safetensors shards of an HF dir (index json or a single model.safetensors), headers read and
    checked: a missing shard, a truncated/corrupt file, or a tensor the index names but the file lacks
    raises an error naming the file and tensor."""
    hf_dir = Path(hf_dir)
    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a safetensors index (expected {{'weight_map': {{tensor: file}}}}; {e!r})") from e
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        shards = []
        for file, names in by_file.items():
            path = hf_dir / file
            if not path.is_file():
                raise FileNotFoundError(f"{path}: shard named in {index} (e.g. for tensor {names[0]}) does not exist")
            entries = read_header(path)
            have = {e.name for e in entries}
            for name in names:
                if name not in have:
                    raise ValueError(f"{path}: tensor {name} is listed in {index} but not stored in this file")
            shards.append(Shard(path, entries))
        return shards
    single = hf_dir / SINGLE_FILE
    if single.is_file():
        return [Shard(single, read_header(single))]
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"{hf_dir}: no such HF model dir")
    raise FileNotFoundError(f"{hf_dir}: no {INDEX_FILE} or {SINGLE_FILE} (mmtune reads safetensors weights only)")


def write_weight_files(out: Path, files: Iterable[tuple[str, list, Iterator]], index: bool) -> None:
    """Write safetensors files into `out`, each given as (file name, plan, tensors) as `write_file` takes
    them, and with `index` the model.safetensors.index.json that maps every tensor to its file."""
    weight_map, total = {}, 0
    for file, plan, tensors in files:
        total += write_file(out / file, plan, tensors)
        weight_map.update((name, file) for name, _, _ in plan)
    if index:
        body = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX_FILE).write_text(json.dumps(body, indent=2) + "\n")


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def copy_non_weight_files(src: Path, dst: Path) -> list[str]:
    """Copy every file and folder of `src` except weights (config, tokenizer, processor, templates...)."""
    copied = []
    for p in sorted(src.iterdir()):
        if p.is_file() and not is_weight_file(p.name):
            shutil.copy2(p, dst / p.name)
            copied.append(p.name)
        elif p.is_dir() and not p.name.startswith("."):
            shutil.copytree(p, dst / p.name)
            copied.append(p.name + "/")
    return copied


@contextlib.contextmanager
def staged_output(out: str | Path, force: bool, protect: list[Path]) -> Iterator[Path]:
    """An output dir written whole or not at all: checks `out` (not one of the inputs `protect`; empty,
    or `force`), yields a fresh temporary sibling to write into, and when the block completes moves it to
    `out` (replacing what `force` allowed to replace); when the block raises, the sibling is removed."""
    out = Path(out)
    tmp = _staging_dir(out, force, protect)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _publish(tmp, out)


def _staging_dir(out: Path, force: bool, protect: list[Path]) -> Path:
    """Check the output dir and return a fresh temporary sibling to write into."""
    for p in protect:
        p_r, out_r = Path(p).resolve(), out.resolve()
        if p_r == out_r or out_r in p_r.parents or p_r in out_r.parents:
            raise ValueError(f"{out}: the output dir must not be, contain or sit inside the input {p}")
    if out.exists():
        if not out.is_dir():
            raise FileExistsError(f"{out}: exists and is not a directory")
        if any(out.iterdir()) and not force:
            raise FileExistsError(f"{out}: exists and is not empty; choose another dir or pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # left by a killed conversion on this machine
        pid = stale.name.rsplit("-", 1)[1]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _publish(tmp: Path, out: Path) -> None:
    """Move a completed staging dir to its final name (replacing what --force allowed to replace)."""
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
