"""HF dir (hub layout) -> DCP checkpoint with native names, streaming shard by shard.

Tensors are read one at a time; each MoE layer's experts are merged into their stacked tensor as they
arrive (the architecture's StateDictAdapter.from_hub; a dense model's tensors pass unchanged); native tensors are written in pieces of at most `piece_bytes`
(dcp_io.PieceWriter, which writes one piece while the next is read). Peak memory: two pieces + the
stacked expert tensors of the layers in flight.
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from mmtune.convert.dcp_io import PieceWriter
from mmtune.weights.hf_files import INDEX_FILE, list_shards, staged_output
from mmtune.weights.safetensors_io import iter_tensors
from mmtune.models import load_config

DEFAULT_PIECE_BYTES = 256 * 2**20


def hf_to_dcp(hf_dir: str | Path, save_dir: str | Path, *, force: bool = False,
              piece_bytes: int = DEFAULT_PIECE_BYTES, progress: bool = True) -> Path:
    """Convert `hf_dir` (any architecture of mmtune.models, by config.json's model_type) to a DCP
    checkpoint at `save_dir` (native names, experts merged, dtypes kept, MTP/unknown tensors kept).
    Returns `save_dir`."""
    hf_dir, save_dir = Path(hf_dir), Path(save_dir)
    arch, config = load_config(hf_dir)
    shards = list_shards(hf_dir)  # every header checked before anything is written
    with staged_output(save_dir, force, protect=[hf_dir]) as tmp:
        _write_pieces(PieceWriter(tmp), arch, config, shards, hf_dir, piece_bytes, progress)
    return save_dir


def _write_pieces(writer, arch, config, shards, hf_dir: Path, piece_bytes: int, progress: bool) -> None:
    """The hub tensors of `shards` in native names through `writer`, in pieces of about `piece_bytes`."""
    total = sum(s.nbytes for s in shards)
    n_tensors = sum(len(s.entries) for s in shards)
    try:
        where = [hf_dir / INDEX_FILE]
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="hf-to-dcp", disable=not progress)
        done = [0]

        def hub_items():
            for shard in shards:
                where[0] = shard.path
                for name, tensor in iter_tensors(shard.path, shard.entries):
                    yield name, tensor
                    done[0] += 1
                    bar.update(tensor.nbytes)
                    bar.set_postfix_str(f"{done[0]}/{n_tensors} tensors")
            where[0] = hf_dir / INDEX_FILE if (hf_dir / INDEX_FILE).exists() else shards[-1].path

        piece, size = {}, 0
        try:
            for name, tensor in arch.adapter_class(config).from_hub(hub_items()):
                piece[name] = tensor
                size += tensor.nbytes
                if size >= piece_bytes:
                    writer.write(piece)
                    piece, size = {}, 0
        except ValueError as e:
            raise ValueError(f"{where[0]}: {e}") from None
        writer.write(piece)
        writer.finish()
        bar.close()
    except BaseException:
        writer.close()
        raise
