"""The training data loader: `build_train_loader(...)` -> torchdata StatefulDataLoader.

Cached path (`streaming: false`): `build_dataset` (cache) -> too-long handling -> `plan_rows` (packing or
one sample a row) -> a map-style `RowDataset` whose items are rows -> `DistributedRowSampler` (seeded
shuffle per epoch, every rank its own share, remainder dropped, endless) -> workers decode images and
collate micro-batches.

Streaming path (`streaming: true`): `StreamingRows`, an IterableDataset that reads the files lazily,
preprocesses each sample when it arrives, packs with `OpenRowsPacker` and yields rows. Item k of the
stream (of one epoch) belongs to rank k % dp_size; within a rank, consecutive micro-batches go to the
loader workers in turn, which is the order the loader returns them. Without shuffle and packing it
yields the same sample sequence as the cached path. Its position (epoch, next item, the items of
still-open packed rows) is saved per worker by `state_dict()` and restored by `load_state_dict()`.

The loader is endless (epochs follow each other); the trainer stops after its iterations.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader

from mmtune.data.collate import Sample, TokenIds, collate, materialise
from mmtune.data.config import DataConfig, load_data_config
from mmtune.data.dataset import PreparedData, SamplePreprocessor, build_dataset, raw_samples
from mmtune.data.packing import OpenRowsPacker, PackStats, plan_rows, truncation_point

log = logging.getLogger(__name__)


def _skip_or_raise(cfg: DataConfig, err: Exception) -> None:
    if cfg.basic.on_bad_sample == "error":
        raise ValueError(f"bad sample (on_bad_sample: error): {err}") from err
    log.warning("skipping bad sample (on_bad_sample: skip): %s", err)


class _Materialiser:
    """Shared by both paths: preprocessed columns -> Sample (pixels, positions), in a worker."""

    def __init__(self, cfg: DataConfig, tokenizer_dir: str, seq_length: int):
        self.cfg, self.seq_length = cfg, seq_length
        self.pre = SamplePreprocessor(cfg, tokenizer_dir)
        self._ids: TokenIds | None = None

    @property
    def ids(self) -> TokenIds:
        if self._ids is None:
            self._ids = TokenIds.from_tokenizer(self.pre.template.tokenizer)
        return self._ids

    def keep_len(self, columns: dict, stats: PackStats) -> int | None:
        """The tokens to keep of a sample (None: drop it) under seq_length and too_long."""
        n = columns["length"]
        if n <= self.seq_length:
            return n
        cut = None
        if self.cfg.basic.too_long == "truncate":
            cut = truncation_point(columns["input_ids"], columns["labels"], self.seq_length,
                                   image_token_id=self.ids.image, image_start_token_id=self.ids.image_start,
                                   video_start_token_id=self.ids.video_start, video_end_token_id=self.ids.video_end)
        if cut is None:
            stats.dropped_too_long += 1
        else:
            stats.truncated += 1
        return cut

    def sample(self, columns: dict, keep: int) -> Sample | None:
        try:
            return materialise(columns, keep, self.pre.image_processor, self.ids, self.pre.video_processor)
        except ValueError as e:
            _skip_or_raise(self.cfg, e)
            return None


class RowDataset(Dataset):
    """Map-style: item i = row i of the plan, a list of Samples (pixels decoded in the worker)."""

    def __init__(self, prepared: PreparedData, rows: list[list[tuple[int, int]]], mat: _Materialiser):
        self.ds, self.rows, self.mat = prepared.ds, rows, mat

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[Sample]:
        out = []
        for ds_row, keep in self.rows[i]:
            s = self.mat.sample(self.ds[ds_row], keep)
            if s is not None:
                out.append(s)
        return out


class DistributedRowSampler(Sampler):
    """Endless, deterministic: epoch e is a permutation of the rows (seed + e; identity without shuffle),
    rank r takes positions r, r + W, ... of its first (n // W) * W; `start` skips this many of the rank's
    items first. Resume is exact: the loader fast-forwards it by the batches already yielded."""

    def __init__(self, n: int, *, rank: int, world: int, shuffle: bool, seed: int, start: int = 0):
        if n < world:
            raise ValueError(f"{n} rows cannot feed {world} data-parallel ranks; add data or lower max_samples")
        self.n, self.rank, self.world, self.shuffle, self.seed, self.start = n, rank, world, shuffle, seed, start

    def __iter__(self):
        per_rank = self.n // self.world
        epoch, offset = divmod(self.start, per_rank)
        while True:
            if self.shuffle:
                g = torch.Generator().manual_seed(self.seed + epoch)
                perm = torch.randperm(self.n, generator=g)
            else:
                perm = torch.arange(self.n)
            mine = perm[self.rank: per_rank * self.world: self.world].tolist()
            yield from mine[offset:]
            epoch, offset = epoch + 1, 0


class StreamingRows(IterableDataset):
    """Lazily read, preprocessed and packed rows for one rank (see the module docstring)."""

    def __init__(self, cfg: DataConfig, mat: _Materialiser, *, rank: int, world: int, micro_batch_size: int,
                 start: int = 0):
        self.cfg, self.mat = cfg, mat
        self.rank, self.world, self.mbs = rank, world, micro_batch_size
        # `next`: the first of this rank's items not read yet; `open`: items read into still-open packed rows
        self.state = {"epoch": 0, "next": start, "open": []}
        self.stats = PackStats(seq_length=mat.seq_length)

    def state_dict(self) -> dict:
        return dict(self.state)

    def load_state_dict(self, state: dict) -> None:
        self.state = dict(state)

    def progress(self, loader_state: dict) -> list[tuple[int, int, list[list[int]]]] | None:
        """Where each loader worker's part of this rank's stream stands, from the loader's `state_dict()`:
        (epoch, k, open rows) per worker, in the stream's item numbers (k counts every rank's items in file
        order): the worker has read its items before k, and the rows it has yielded hold all of them but
        those of its open rows (and the dropped ones). `resume_point` combines the ranks' lists. None if the
        state does not show every worker."""
        states = _dataset_states(loader_state)
        if not states or any(not isinstance(st, dict) or "next" not in st for st in states):
            return None
        out = []
        for worker, st in enumerate(states):
            j = st["next"]
            while not self._mine(j, worker, len(states)):  # this worker's next own item
                j += 1
            out.append((st["epoch"], self._item(j), [[self._item(i) for i in row] for row in st.get("open", [])]))
        return out

    def _item(self, j: int) -> int:
        return j * self.world + self.rank

    def _mine(self, j: int, worker: int, workers: int) -> bool:
        return (j // self.mbs) % workers == worker

    def _rank_items(self, start: int):
        """(j, columns) for this rank's items j >= start, in order (bad ones skipped or raised)."""
        for k, (rec, src) in enumerate(raw_samples(self.cfg)):
            if k % self.world != self.rank:
                continue
            j = k // self.world
            if j < start:
                continue
            yield j, rec, src

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        while True:
            from_start = self.state["next"] == 0 and not self.state.get("open")
            rows = self._pass_packed(worker, workers) if self.cfg.basic.packing else self._pass_plain(worker, workers)
            emitted_any = False
            for row in rows:
                emitted_any = True
                yield row
            self.state = {"epoch": self.state["epoch"] + 1, "next": 0, "open": []}
            if not emitted_any and from_start:
                raise ValueError(f"streaming: loader worker {worker} of rank {self.rank} got no usable sample in a "
                                 f"whole pass; each rank needs >= micro_batch_size * num_workers good samples "
                                 f"(lower num_workers or micro_batch_size)")

    def _samples(self, start: int, worker: int, workers: int, wanted=None):
        """(j, Sample, kept length) of this worker's good items j >= start (and j in `wanted` if given, for
        j below state['next'])."""
        nxt = self.state["next"]
        for j, rec, src in self._rank_items(start):
            if not self._mine(j, worker, workers) or (j < nxt and (wanted is None or j not in wanted)):
                continue
            cols = self.mat.pre(rec, src)
            if cols["error"]:
                if j >= nxt:
                    _skip_or_raise(self.cfg, ValueError(f"{src}: {cols['error']}"))
                continue
            keep = self.mat.keep_len(cols, self.stats)
            s = self.mat.sample(cols, keep) if keep is not None else None
            if s is not None:
                yield j, s, keep

    def _pass_plain(self, worker: int, workers: int):
        for j, s, _ in self._samples(self.state["next"], worker, workers):
            self.state["next"] = j + 1
            yield [s]

    def _pass_packed(self, worker: int, workers: int):
        """Rows from an OpenRowsPacker; the state names the open rows, which a resume re-reads."""
        pending = self.state.get("open", [])
        wanted = {j for row in pending for j in row}
        packer = OpenRowsPacker(self.mat.seq_length)
        restored: dict = {}
        start = min(wanted | {self.state["next"]})
        last = start - 1
        for j, s, keep in self._samples(start, worker, workers, wanted):
            if j < self.state["next"]:
                restored[j] = (s, keep)
                continue
            if wanted:
                packer.restore(pending, restored)
                wanted, restored = set(), {}
            last = j
            for row in packer.add(j, s, keep):
                self.state.update(next=j + 1, open=packer.open_keys())
                yield [x for _, x, _ in row]
        if wanted:
            packer.restore(pending, restored)
        out = packer.flush()
        for k, row in enumerate(out):
            self.state.update(next=max(last + 1, self.state["next"]), open=[[key for key, _, _ in r] for r in out[k + 1:]])
            yield [x for _, x, _ in row]


def plan_cached_rows(prepared: PreparedData, mat: _Materialiser, cfg: DataConfig) -> tuple[list, PackStats]:
    """The rows of the cached path: too-long samples dropped or cut (too_long), then packed or one a row;
    each row a list of (dataset row, kept length)."""
    seq_length = mat.seq_length
    stats = PackStats(seq_length=seq_length, packed=cfg.basic.packing)
    items, lengths = [], []
    all_lengths = prepared.ds["length"]
    for i in prepared.good:
        keep = mat.keep_len(prepared.ds[i] if all_lengths[i] > seq_length else {"length": all_lengths[i]}, stats)
        if keep is not None:
            items.append(i)
            lengths.append(keep)
    if not items:
        raise ValueError(f"every sample is longer than seq_length {seq_length} (too_long: {cfg.basic.too_long})")
    rows = [[(items[k], lengths[k]) for k in row] for row in plan_rows(lengths, seq_length, pack=cfg.basic.packing)]
    stats.samples, stats.rows, stats.tokens = len(items), len(rows), sum(lengths)
    return rows, stats


def preview_rows(cfg: DataConfig, prepared: PreparedData, tokenizer_dir, seq_length: int) -> PackStats:
    """What training with `seq_length` would make of these samples (rows, too-long counts), without a loader."""
    return plan_cached_rows(prepared, _Materialiser(cfg, str(tokenizer_dir), seq_length), cfg)[1]


class _Collate:
    def __init__(self, pad_id: int, pad_to: int | None, one_buffer: bool = False):
        self.pad_id, self.pad_to, self.one_buffer = pad_id, pad_to, one_buffer

    def __call__(self, rows: list[list[Sample]]) -> dict:
        batch = collate(rows, pad_id=self.pad_id, pad_to=self.pad_to)
        return to_one_buffer(batch) if self.one_buffer else batch


# A batch from a loader worker reaches the training process through shared memory, one handle per tensor,
# and each handle costs a socket connection with an authentication round trip (about 0.5 ms on the CPU
# machine: 6-8 tensors made the loader's wait per step ~4 ms, 3-5% of a demo step; docs/PERFORMANCE.md
# "Data wait"). So the worker copies the batch's tensors into one byte buffer, which travels as one handle,
# and the loader hands out views of it.
_BUFFER = "_one_buffer"
_ALIGN = 64  # bytes: each tensor starts aligned (vectorised kernels; torch's grouped matmul wants 16)


class _Slice(NamedTuple):
    """Where one tensor of a batch lies in its one buffer."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def to_one_buffer(batch: dict) -> dict:
    """The batch with its tensors copied into one uint8 buffer (under key `_BUFFER`), each replaced by its
    `_Slice`; other values unchanged."""
    out, size = {}, 0
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            nbytes = value.numel() * value.element_size()
            value = _Slice(value.dtype, tuple(value.shape), size, nbytes)
            size += -(-nbytes // _ALIGN) * _ALIGN
        out[key] = value
    buffer = torch.empty(size, dtype=torch.uint8)
    for key, where in out.items():
        if isinstance(where, _Slice):
            _view(buffer, where).copy_(batch[key])
    out[_BUFFER] = buffer
    return out


def from_one_buffer(batch: dict) -> dict:
    """The inverse of `to_one_buffer` (the tensors as views of the buffer); other batches unchanged."""
    if _BUFFER not in batch:
        return batch
    buffer = batch[_BUFFER]
    return {k: _view(buffer, v) if isinstance(v, _Slice) else v for k, v in batch.items() if k != _BUFFER}


def _view(buffer: torch.Tensor, where: _Slice) -> torch.Tensor:
    return buffer[where.offset:where.offset + where.nbytes].view(where.dtype).view(where.shape)


def _dataset_states(loader_state: dict) -> list | None:
    """The dataset's state in each loader worker (one, the loader's own, without workers) from a
    StatefulDataLoader `state_dict()` (torchdata 0.11's layout), or None."""
    snapshot = loader_state.get("_snapshot")
    if snapshot is None:
        return [loader_state.get("dataset_state")] if "dataset_state" in loader_state else None
    workers = snapshot.get("_worker_snapshots") or {}
    return [(workers.get(f"worker_{w}") or {}).get("dataset_state") for w in range(len(workers))] or None


def stream_progress(loader):
    """`StreamingRows.progress` of a training loader's stream (None for cached data or an unknown state)."""
    ds = getattr(loader, "dataset", None)
    return ds.progress(loader.state_dict()) if isinstance(ds, StreamingRows) else None


def resume_point(progress: list) -> dict:
    """Where every rank of a new layout resumes a stream whose workers (of all ranks) stood at `progress`
    (`StreamingRows.progress` lists, concatenated): {"epoch", "k", "open"}. Items from k on are read again
    (a faster worker's trained ones among them: read twice, at most the workers' spread); the items before
    k that sat in open rows are read back into open rows; every other item before k was trained."""
    epoch = min(e for e, _, _ in progress)
    k = min(k for e, k, _ in progress if e == epoch)
    rows = {tuple(i for i in row if i < k) for e, _, open_rows in progress if e == epoch for row in open_rows}
    return {"epoch": epoch, "k": k, "open": sorted(list(row) for row in rows if row)}


class TrainLoader(StatefulDataLoader):
    """A StatefulDataLoader whose workers may send each batch as one buffer (`to_one_buffer`); iterating
    yields the ordinary batch dicts."""

    def __iter__(self):
        return map(from_one_buffer, super().__iter__())


def build_train_loader(data_cfg, *, tokenizer_dir=None, seq_length: int, micro_batch_size: int, dp_rank: int = 0,
                       dp_size: int = 1, seed: int = 1234, num_workers: int | None = None,
                       consumed_samples: int = 0, stream_start: dict | None = None, progress: bool = True,
                       pin_memory: bool | None = None):
    """The training loader of one data-parallel rank.

    Args:
        data_cfg: a DataConfig, or the path of a data.json.
        tokenizer_dir: tokenizer + preprocessor_config.json dir (default: preprocess_parameters.model_name_or_path).
        seq_length: tokens per row; longer samples are dropped or truncated (basic_parameters.too_long).
        micro_batch_size: rows per batch (each row a packed set of samples, or one sample when packing is off).
        dp_rank, dp_size: this rank and the data-parallel world size; every rank gets a disjoint share.
        seed: shuffle seed (dataloader_param.shuffle switches shuffling; epoch e uses seed + e).
        num_workers: loader worker processes (default: dataloader_param.num_workers).
        pin_memory: pinned host memory for batches (default: dataloader_param.pin_memory where CUDA is
            available; pinning without a GPU does nothing).
        consumed_samples: rows already consumed by all ranks together (global_batch_size * steps); the
            loader starts after them. For exact resume prefer `loader.load_state_dict(saved)`.
        stream_start: streaming only, instead of consumed_samples: a `resume_point` of a saved run (its
            items before k are skipped, but for those of its open rows, which this rank's share of reopens).

    Returns a `TrainLoader` (a torchdata `StatefulDataLoader`), endless, yielding the batch dicts of
    docs/INTERNALS.md ("A training batch"); `loader.state_dict()` goes into checkpoints. Its
    `.pack_stats` (cached path) holds packing efficiency and too-long counts, `.prepared` the samples.
    """
    cfg = data_cfg if isinstance(data_cfg, DataConfig) else load_data_config(data_cfg)
    tokenizer_dir = tokenizer_dir or cfg.preprocess.model_name_or_path
    if not tokenizer_dir:
        raise ValueError("no tokenizer: pass tokenizer_dir or set preprocess_parameters.model_name_or_path")
    if not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"tokenizer dir {tokenizer_dir} does not exist (preprocess_parameters.model_name_or_path)")
    if seq_length < 8 or micro_batch_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"bad loader sizes: seq_length={seq_length}, micro_batch_size={micro_batch_size}, "
                         f"dp_rank={dp_rank}, dp_size={dp_size}")
    if consumed_samples % dp_size:
        raise ValueError(f"consumed_samples {consumed_samples} is not a multiple of dp_size {dp_size}")
    workers = cfg.dataloader_param.num_workers if num_workers is None else num_workers
    mat = _Materialiser(cfg, str(tokenizer_dir), seq_length)
    pad_to = seq_length if cfg.basic.packing else None
    if pin_memory is None:
        pin_memory = cfg.dataloader_param.pin_memory and torch.cuda.is_available()
    common = dict(batch_size=micro_batch_size, num_workers=workers, pin_memory=pin_memory,
                  collate_fn=_Collate(mat.ids.pad, pad_to, one_buffer=workers > 0))
    start = consumed_samples // dp_size
    if cfg.basic.streaming:
        ds = StreamingRows(cfg, mat, rank=dp_rank, world=dp_size, micro_batch_size=micro_batch_size, start=start)
        if stream_start is not None:  # this rank's first item at or after item k, and its items of the open rows
            k = stream_start["k"]
            mine = [[i // dp_size for i in row if i % dp_size == dp_rank] for row in stream_start["open"]]
            ds.state = {"epoch": stream_start["epoch"], "next": max(0, k - dp_rank + dp_size - 1) // dp_size,
                        "open": [row for row in mine if row]}
        loader = TrainLoader(ds, **common)
        loader.pack_stats, loader.prepared = ds.stats, None
        return loader
    prepared = build_dataset(cfg, tokenizer_dir, progress=progress)
    rows, stats = plan_cached_rows(prepared, mat, cfg)
    log.info("data: %s", stats.summary())
    sampler = DistributedRowSampler(len(rows), rank=dp_rank, world=dp_size, shuffle=cfg.dataloader_param.shuffle,
                                    seed=seed, start=start)
    loader = TrainLoader(RowDataset(prepared, rows, mat), sampler=sampler, drop_last=True, **common)
    loader.pack_stats, loader.prepared = stats, prepared
    return loader
