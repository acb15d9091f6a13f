"""Data files -> tokenised samples: reading, per-sample preprocessing, and the HF `datasets` cache.

A sample is preprocessed once into columns: `input_ids`, `labels` (unshifted), `images` (absolute
paths), `grids` ([t, h, w] per image), `videos` (absolute paths), `video_grids` ([t, h, w] per video),
`video_frames` (the frame indices read from each video), `length`, `src` ("file:index") and `error`
("" when good). Pixels are not stored: preprocessing reads only image and video headers (token counts
and timestamps follow from them) and the loader workers decode pixels.

The cached path (`streaming: false`) runs this through `datasets.Dataset.map` (num_proc =
`preprocessing_num_workers`, `preprocessing_batch_size` samples per call, in chunks that feed one
progress bar) and saves the result under `cache_dir/mmtune-<fingerprint>`; the fingerprint covers the
data files' bytes, every config key that changes preprocessing, the tokenizer and preprocessor files,
and a format version, so a second run reuses it and any change rebuilds it (`overwrite_cache: true`
forces a rebuild). Image and video files are not in it (hashing them would read them all); a reused
cache that recorded samples bad for a missing file that exists now is rebuilt. On many processes and
nodes one of them builds the cache and the others wait for it (data/cache.py). Without `cache_dir` the
result stays in memory.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmtune.data.config import DataConfig, climbs_out
from mmtune.data.images import ImageProcessor, open_image
from mmtune.data.template import NOT_UTF8, BadSample, GlmTemplate, VideoTokens, has_lone_surrogate
from mmtune.data.video import VideoProcessor

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # 3: symlinked images are inside dataset_dir, lone surrogates are bad samples
_BAD_SHOWN = 10


# ---------------------------------------------------------------- reading files lazily


def iter_records(path: str | os.PathLike, start: int = 0) -> Iterator[tuple[int, object]]:
    """(index, record) of a json list or jsonl file, parsed incrementally (never the whole file as
    objects at once); records before `start` are parsed and skipped."""
    p = Path(path)
    with open(p, encoding="utf-8") as f:
        head = f.read(1)
        while head and head.isspace():
            head = f.read(1)
        if head != "[":  # jsonl
            f.seek(0)
            k = 0
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                if k >= start:
                    try:
                        yield k, json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{p}:{line_no}: not valid json ({e})") from e
                k += 1
            return
        yield from _iter_json_array(f, p, start)


def _iter_json_array(f, p: Path, start: int) -> Iterator[tuple[int, object]]:
    dec = json.JSONDecoder()
    buf, pos, k, eof = "", 0, 0, False
    while True:
        while True:  # skip separators
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) or eof:
                break
            buf, pos = f.read(1 << 20), 0
            eof = not buf
        if pos >= len(buf) or buf[pos] == "]":
            return
        while True:
            try:
                obj, end = dec.raw_decode(buf, pos)
                break
            except json.JSONDecodeError as e:
                more = f.read(1 << 20)
                if not more:
                    raise ValueError(f"{p}: not valid json near record {k} ({e})") from e
                buf, pos = buf[pos:] + more, 0
        if k >= start:
            yield k, obj
        k, pos = k + 1, end
        if pos > (1 << 20):
            buf, pos = buf[pos:], 0


# ---------------------------------------------------------------- one sample


_MISSING_FILE = re.compile(r"missing (image|video) file (.+)")  # resolve_image's message, read back by _files_back


def resolve_image(name: object, dataset_dir: Path, allow_outside: bool, what: str = "image") -> Path:
    """The file of an image (or video) entry, under dataset_dir unless allow_outside.

    The containment check is on the path as written (normalised lexically, links not followed): images
    and image folders that are symlinks (a Hugging Face snapshot's files link into ../../blobs,
    data/COCO2017 -> shared storage) are inside dataset_dir where they sit; a `..` that climbs out is
    not. The returned path keeps the links; only the existence check follows them."""
    if not isinstance(name, str) or not name:
        raise BadSample(f"bad {what} entry {name!r}")
    rel = Path(name)
    if not allow_outside:
        if rel.is_absolute():
            raise BadSample(f"absolute {what} path {name!r} (set allow_absolute_image_paths to accept)")
        if climbs_out(rel):
            raise BadSample(f"{what} path {name!r} is outside dataset_dir {dataset_dir}")
    full = Path(os.path.normpath(dataset_dir / rel))  # what was checked is what is opened
    if not full.is_file():
        raise BadSample(f"missing {what} file {full}")
    return full


@dataclass
class Record:
    """One sample in the template's terms (data/template.py): messages, tools, image and video entries."""

    messages: list[dict]
    images: list
    videos: list
    tools: list | None = None


def _entries(value) -> list:
    if value is None or value == "":
        return []
    return [value] if isinstance(value, str) else list(value)


def _json(value, what: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise BadSample(f"{what} is not valid JSON ({e})") from None
    return value


def _tool_calls(value, k: int) -> list[dict]:
    """[{"name", "arguments": dict}] from a LLaMA-Factory function message's content (a call or a list,
    JSON text or objects) or an OpenAI `tool_calls` list ({"function": {...}} wrappers, JSON-text arguments)."""
    calls = _json(value, f"message {k}: the tool call")
    calls = calls if isinstance(calls, list) else [calls]
    out = []
    for c in calls:
        c = c.get("function", c) if isinstance(c, dict) else c
        if not isinstance(c, dict) or not isinstance(c.get("name"), str):
            raise BadSample(f"message {k}: a tool call needs a name and arguments, got {c!r}")
        args = _json(c.get("arguments", {}), f"message {k}: the arguments of {c['name']!r}")
        if not isinstance(args, dict):
            raise BadSample(f"message {k}: the arguments of {c['name']!r} are not an object")
        out.append({"name": c["name"], "arguments": args})
    return out


def normalise_record(raw: object, cfg: DataConfig) -> Record:
    """The sample per the data.json attr: roles user/assistant/system/tool and string contents. Tool calls
    come as LLaMA-Factory `function_tag` messages (content: a call {"name", "arguments"} or a list, with an
    optional `<think>...</think>` in front) or OpenAI assistant `tool_calls`; tool results as
    `observation_tag` or OpenAI `tool` messages; tools from the `attr.tools` column (JSON text or a list).
    Anything about tools needs basic_parameters.tool_format. Text that cannot be UTF-8 encoded (a lone
    surrogate) makes the sample bad here, before the tokenizer or Arrow meets it."""
    a = cfg.attr
    if not isinstance(raw, dict):
        raise BadSample("sample is not a json object")
    for col in (a.system, a.tools, a.images, a.videos):
        if col and has_lone_surrogate(raw.get(col)):
            raise BadSample(f"{NOT_UTF8} in the {col!r} column")
    msgs = raw.get(a.messages)
    if not isinstance(msgs, list) or not msgs:
        raise BadSample(f"no {a.messages!r} list (the attr.messages column)")
    roles = {a.user_tag: "user", a.assistant_tag: "assistant"}
    if a.system_tag:
        roles[a.system_tag] = "system"
    roles[a.function_tag or "function_call"] = "function"
    roles[a.observation_tag or "observation"] = "tool"
    for default in ("system", "tool"):
        roles.setdefault(default, default)
    out: list[dict] = []
    if a.system and raw.get(a.system):
        out.append({"role": "system", "content": raw[a.system]})
    uses_tools = False
    for k, m in enumerate(msgs):
        if has_lone_surrogate(m):
            raise BadSample(f"{NOT_UTF8} in message {k}")
        if not isinstance(m, dict) or a.role_tag not in m or (a.content_tag not in m and "tool_calls" not in m):
            raise BadSample(f"message {k} lacks {a.role_tag!r} or {a.content_tag!r}")
        role = roles.get(m[a.role_tag])
        if role is None:
            raise BadSample(f"message {k}: unknown role {m[a.role_tag]!r}")
        content = m.get(a.content_tag)
        if role == "function":
            uses_tools = True
            reasoning = ""
            if isinstance(content, str) and "</think>" in content:
                head, _, content = content.partition("</think>")
                reasoning = head.split("<think>")[-1]
            msg = {"role": "assistant", "content": "", "tool_calls": _tool_calls(content, k)}
            if reasoning.strip():
                msg["reasoning_content"] = reasoning
        else:
            msg = {"role": role, "content": "" if content is None and m.get("tool_calls") else content}
            if role == "assistant" and m.get("tool_calls"):
                msg["tool_calls"] = _tool_calls(m["tool_calls"], k)
            if role == "assistant" and isinstance(m.get("reasoning_content"), str):
                msg["reasoning_content"] = m["reasoning_content"]
        uses_tools |= role == "tool" or bool(msg.get("tool_calls"))
        out.append(msg)
    tools = _json(raw.get(a.tools), "the tools column") if a.tools else None
    if tools in (None, "", []):
        tools = None
    elif not isinstance(tools, list):
        tools = [tools]
    if (uses_tools or tools) and cfg.basic.tool_format is None:
        raise BadSample("tool calls, tool results or tools need basic_parameters.tool_format: glm4_moe (it is null)")
    images = _entries(raw.get(a.images) if a.images else None)
    videos = _entries(raw.get(a.videos) if a.videos else None)
    return Record(out, images, videos, tools)


def tokenizer_fingerprint_files(tokenizer_dir: Path) -> list[Path]:
    names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
             "preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json")
    return [tokenizer_dir / n for n in names if (tokenizer_dir / n).is_file()]


class SamplePreprocessor:
    """raw record -> columns. Picklable (datasets' num_proc workers); loads the tokenizer lazily."""

    def __init__(self, cfg: DataConfig, tokenizer_dir: str | os.PathLike):
        self.cfg = cfg
        self.tokenizer_dir = str(tokenizer_dir)
        self._template: GlmTemplate | None = None
        self._images: ImageProcessor | None = None
        self._videos: VideoProcessor | None = None

    def __getstate__(self):
        return {"cfg": self.cfg, "tokenizer_dir": self.tokenizer_dir, "_template": None, "_images": None,
                "_videos": None}

    def setup(self):
        if self._template is None:
            from transformers import AutoTokenizer

            b, p = self.cfg.basic, self.cfg.preprocess
            tok = AutoTokenizer.from_pretrained(self.tokenizer_dir, split_special_tokens=p.split_special_tokens)
            self._template = GlmTemplate(tok, enable_thinking=b.enable_thinking,
                                         train_on_prompt=b.train_on_prompt, mask_history=b.mask_history)
            self._images = ImageProcessor.from_pretrained(self.tokenizer_dir, image_min_pixels=p.image_min_pixels,
                                                          image_max_pixels=p.image_max_pixels)
            self._videos = VideoProcessor.from_pretrained(self.tokenizer_dir, video_fps=p.video_fps,
                                                          video_maxlen=p.video_maxlen, video_min_pixels=p.video_min_pixels,
                                                          video_max_pixels=p.video_max_pixels)
        return self._template, self._images

    @property
    def template(self) -> GlmTemplate:
        return self.setup()[0]

    @property
    def image_processor(self) -> ImageProcessor:
        return self.setup()[1]

    @property
    def video_processor(self) -> VideoProcessor:
        self.setup()
        return self._videos

    def __call__(self, raw: object, src: str) -> dict:
        template, improc = self.setup()
        try:
            rec = normalise_record(raw, self.cfg)
            ddir, allow = self.cfg.dataset_dir(), self.cfg.basic.allow_absolute_image_paths
            paths = [resolve_image(e, ddir, allow) for e in rec.images]
            video_paths = [resolve_image(e, ddir, allow, "video") for e in rec.videos]
            grids = []
            for path in paths:
                with open_image(path, decode=False) as img:
                    grids.append(list(improc.grid_thw(img.width, img.height)))
            plans = [self._videos.plan_file(p) for p in video_paths]
            merge = improc.merge_size**2
            videos = [VideoTokens(self._videos.frame_tokens(pl.grid), pl.timestamps) for pl in plans]
            enc = template.encode(rec.messages, [t * h * w // merge for t, h, w in grids], videos, rec.tools)
            if not any(lab != -100 for lab in enc.labels):
                raise BadSample("no trained token")
            return {"input_ids": enc.input_ids, "labels": enc.labels, "images": [str(p) for p in paths],
                    "grids": grids, "videos": [str(p) for p in video_paths], "video_grids": [list(pl.grid) for pl in plans],
                    "video_frames": [pl.indices for pl in plans], "length": len(enc.input_ids), "src": src, "error": ""}
        except (BadSample, ValueError, FileNotFoundError) as e:
            return {"input_ids": [], "labels": [], "images": [], "grids": [], "videos": [], "video_grids": [],
                    "video_frames": [], "length": 0, "src": src, "error": str(e) or type(e).__name__}


# ---------------------------------------------------------------- the cached data set


@dataclass
class PreparedData:
    """Preprocessed samples: `ds` (a datasets.Dataset with the columns above, bad rows included),
    `good` (row numbers of the good samples, in file order) and `bad` ((src, reason) pairs)."""

    ds: object
    good: list[int]
    bad: list[tuple[str, str]]
    cache_path: Path | None = None
    from_cache: bool = False  # read a cache this process did not build
    note: str = ""  # what happened to the cache (built / reused / waited), one line


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def fingerprint(cfg: DataConfig, tokenizer_dir: Path, files: list[Path]) -> str:
    b, p = cfg.basic, cfg.preprocess
    key = {
        "version": CACHE_VERSION,
        "files": [[str(f), _sha256_file(f)] for f in files],
        "tokenizer": [[f.name, _sha256_file(f)] for f in tokenizer_fingerprint_files(tokenizer_dir)],
        "basic": {k: getattr(b, k) for k in ("template", "enable_thinking", "train_on_prompt", "mask_history",
                                             "max_samples", "allow_absolute_image_paths", "tool_format")},
        "dataset_dir": str(cfg.dataset_dir()),
        "preprocess": p.model_dump(),
        "attr": cfg.attr.model_dump(),
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _files_back(errors: list[str]) -> list[str]:
    """The image and video files that samples were marked bad for as missing and that exist now, each once
    (the fingerprint covers the data files, not the media they name, so a cache cannot see them arrive)."""
    seen: dict[str, bool] = {}
    for e in errors:
        m = _MISSING_FILE.fullmatch(e) if e else None
        if m and m[2] not in seen:
            seen[m[2]] = os.path.isfile(m[2])
    return [path for path, now in seen.items() if now]


def _features():
    """The column types, fixed (a batch without videos would otherwise type their columns as null)."""
    from datasets import Features, Sequence, Value

    ints, strings = Sequence(Value("int64")), Sequence(Value("string"))
    return Features({"src": Value("string"), "input_ids": ints, "labels": ints, "images": strings,
                     "grids": Sequence(ints), "videos": strings, "video_grids": Sequence(ints),
                     "video_frames": Sequence(ints), "length": Value("int64"), "error": Value("string")})


def _map_batch(batch: dict, fn: SamplePreprocessor) -> dict:
    rows = [fn(json.loads(raw), src) for raw, src in zip(batch["raw"], batch["src"])]
    return {k: [r[k] for r in rows] for k in rows[0]} if rows else {}


def raw_samples(cfg: DataConfig) -> Iterator[tuple[object, str]]:
    """(record, "file:index") for every sample of every data file, honouring max_samples per file."""
    for path in cfg.dataset_files():
        for k, rec in iter_records(path):
            if cfg.basic.max_samples is not None and k >= cfg.basic.max_samples:
                break
            yield rec, f"{path}:{k}"


def _preprocess(cfg: DataConfig, tokenizer_dir: Path, num_proc: int | None, progress: bool, lock=None):
    """Every sample -> columns (a datasets.Dataset, bad samples as rows with `error`), in chunks so that
    the progress bar (and the waiters of a cache build, through `lock`) see samples done."""
    import datasets
    from tqdm import tqdm

    b = cfg.basic
    raws, srcs = [], []
    for rec, src in raw_samples(cfg):
        text = json.dumps(rec, ensure_ascii=False)
        if has_lone_surrogate(text):  # not UTF-8, so not an Arrow string: keep it \u-escaped, normalise_record names it
            text = json.dumps(rec)
        raws.append(text)
        srcs.append(src)
    raw_ds = datasets.Dataset.from_dict({"raw": raws, "src": srcs})
    del raws
    n = len(raw_ds)
    nproc = num_proc if num_proc is not None else b.preprocessing_num_workers
    nproc = nproc if nproc and nproc > 1 else None
    batch = b.preprocessing_batch_size
    chunk = batch * (nproc or 1) * 4
    if lock is not None:
        lock.update(0, n, "preprocessing")
    fn = SamplePreprocessor(cfg, tokenizer_dir)
    was = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # ours counts samples over the chunks
    parts = []
    try:
        with tqdm(total=n, desc="preprocess samples", unit="sample", disable=not progress) as bar:
            for lo in range(0, max(n, 1), chunk):
                part = raw_ds.select(range(lo, min(n, lo + chunk)))
                procs = nproc if nproc and len(part) >= 2 * nproc else None
                parts.append(part.map(_map_batch, batched=True, batch_size=batch, fn_kwargs={"fn": fn},
                                      remove_columns=["raw"], num_proc=procs, load_from_cache_file=False,
                                      features=_features()))
                bar.update(len(part))
                if lock is not None:
                    lock.update(bar.n)
    finally:
        if was:
            datasets.enable_progress_bars()
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def build_dataset(cfg: DataConfig, tokenizer_dir: str | os.PathLike, *, num_proc: int | None = None,
                  progress: bool = True, token: str | None = None) -> PreparedData:
    """Preprocess (or load from the cache) every sample of the data.json's files.

    With `cache_dir` the cache is built by one process and read by all (data/cache.py); `token`
    (default: a fresh one, `cache.rebuild_token()` under torch.distributed) is what overwrite_cache
    rebuilds under. Bad samples are kept as rows with `error` set; with on_bad_sample=error this raises
    ValueError naming the first ones (file:index: reason), with skip they are counted and logged."""
    import datasets

    from mmtune.data.cache import get_or_build, read_build_info, rebuild_token

    tokenizer_dir = Path(tokenizer_dir)
    files = cfg.dataset_files()
    b = cfg.basic
    cache_path, from_cache, note = None, False, ""
    if b.cache_dir:
        name = f"mmtune-{fingerprint(cfg, tokenizer_dir, files)}"
        if b.overwrite_cache and token is None:
            token = rebuild_token()

        def build(staging: Path, lock) -> None:
            _preprocess(cfg, tokenizer_dir, num_proc, progress, lock).save_to_disk(str(staging))

        cache_dir = Path(b.cache_dir).resolve()
        res = get_or_build(cache_dir, name, build, token=token if b.overwrite_cache else None, progress=progress)
        ds = datasets.load_from_disk(str(res.path))
        back = [] if res.built else _files_back(ds["error"] if len(ds) else [])
        refresh = ""
        if back:
            refresh = f"rebuilding: {len(back)} image/video files recorded missing now exist (e.g. {back[0]}); "
            log.warning("data cache: %s: %s", res.path, refresh.rstrip("; "))
            # The token names the cache read and the files back: every process that read that cache asks
            # for the same one rebuild (and accepts it), with no collective call.
            info = read_build_info(res.path)
            key = json.dumps([res.path.name, info.get("built"), info.get("token"), back]).encode()
            again = "files-back-" + hashlib.sha256(key).hexdigest()[:16]
            res = get_or_build(cache_dir, name, build, token=again, progress=progress)
            ds = datasets.load_from_disk(str(res.path))
        cache_path, from_cache = res.path, not res.built
        if res.built:
            note = f"data cache: {refresh}built {res.path} ({len(ds)} samples)"
        elif res.waited_s:
            note = f"data cache: {refresh}waited {res.waited_s:.0f}s for {res.builder} to build it, then reused {res.path}"
        else:
            note = f"data cache: reused {res.path} ({len(ds)} samples, built by {res.builder})"
        (log.info if res.built else log.debug)("%s", note)  # the one builder says so, whatever its rank
    else:
        ds = _preprocess(cfg, tokenizer_dir, num_proc, progress)
    errors = ds["error"] if len(ds) else []
    good = [i for i, e in enumerate(errors) if not e]
    bad = [(ds[i]["src"], e) for i, e in enumerate(errors) if e]
    if bad:
        listing = "\n".join(f"  {s}: {r}" for s, r in bad[:_BAD_SHOWN])
        more = f"\n  ... and {len(bad) - _BAD_SHOWN} more (mmtune data check lists all)" if len(bad) > _BAD_SHOWN else ""
        if from_cache:  # files fixed since the build (other than missing ones appearing) do not change the fingerprint
            more += (f"\n  (as recorded in the data cache {cache_path}; if you fixed image or video files since, "
                     "set overwrite_cache: true to read them again)")
        if b.on_bad_sample == "error":
            raise ValueError(f"{len(bad)} bad samples (on_bad_sample: error):\n{listing}{more}")
        log.warning("skipping %d bad samples (on_bad_sample: skip):\n%s%s", len(bad), listing, more)
    if not good:
        raise ValueError(f"no good samples in {', '.join(map(str, files))}")
    return PreparedData(ds, good, bad, cache_path, from_cache, note)
