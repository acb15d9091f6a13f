"""LLaVA-Instruct json -> MLLM json (`mmtune data llava-to-mllm`).

LLaVA sample: {"id", "image": "rel/path.jpg" (optional), "video": "rel/clip.mp4" (optional, LLaVA-Video
style), "conversations": [{"from": "human"|"gpt", "value"}]}; "image"/"video" may also be lists.
MLLM sample:  {"id", "messages": [{"role": "user"|"assistant"|"system", "content"}], "images": [path]} (+
"videos": [path] when the sample has videos).

Text is kept byte for byte (non-ASCII too; the json is written with ensure_ascii=False). A sample without
an image (no key, null or "") becomes text-only with images: []. Image paths are looked up under
`image_dir` (default: the input file's folder) and written relative to the output file's folder, which is
then the data set's `dataset_dir`; symlinks on the way (data/COCO2017 -> shared storage, a Hugging Face
snapshot's files) are kept as written, not replaced by their targets. A sample that cannot be converted
(also: text with a lone surrogate, which cannot be written as UTF-8) is skipped and named in the report.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from mmtune.data.config import climbs_out
from mmtune.data.template import NOT_UTF8, has_lone_surrogate

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass
class ConversionReport:
    kept: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (sample id or "index N", reason)
    outside: int = 0  # kept samples whose image/video paths climb out of the output's folder ("../")

    def summary(self) -> str:
        return f"kept {self.kept} samples, skipped {len(self.skipped)}"

    def outside_note(self, output: str | os.PathLike) -> str | None:
        """What training will say about "../" paths, and the two ways out; None when there are none."""
        if not self.outside:
            return None
        return (f"{self.outside} samples name images outside {Path(output).parent} (written as ../...): with "
                f"dataset_dir = that folder, training skips them as outside dataset_dir unless the data config "
                f"sets allow_absolute_image_paths: true; or write the output into a folder that holds the images")


def read_records(path: str | os.PathLike) -> list:
    """A json list or a jsonl file (one object a line)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8")
    stripped = text.lstrip()
    try:
        if stripped.startswith("["):
            return json.loads(text)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid json or jsonl ({e}); expected a list of samples") from e


def _media(value, what: str, image_dir: Path, out_dir: Path) -> list[str]:
    """An "image"/"video" entry (absent, a path or a list) -> paths relative to out_dir. Containment in
    image_dir is judged on the path as written (lexically, as training judges dataset_dir), and the
    written path keeps any symlinks: training reads the link where it sits."""
    names = [] if value in (None, "") else [value] if isinstance(value, str) else list(value)
    out = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"bad {what} entry {name!r}")
        rel = Path(name)
        if rel.is_absolute() or climbs_out(rel):
            raise ValueError(f"{what} path {name!r} escapes the image dir {image_dir}")
        full = os.path.abspath(image_dir / rel)  # normalised, links not followed
        if not os.path.isfile(full):
            raise ValueError(f"{what} file missing: {full}")
        out.append(Path(os.path.relpath(full, os.path.abspath(out_dir))).as_posix())
    return out


def convert_sample(sample: dict, image_dir: Path, out_dir: Path) -> dict:
    """One LLaVA sample -> MLLM; raises ValueError(reason) when it cannot be converted."""
    if not isinstance(sample, dict):
        raise ValueError("not a json object")
    for key in ("id", "image", "video"):
        if has_lone_surrogate(sample.get(key)):
            raise ValueError(f"{NOT_UTF8} in {key!r}")
    convs = sample.get("conversations")
    if not convs:
        raise ValueError("empty conversation")
    messages = []
    for k, turn in enumerate(convs):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise ValueError(f"turn {k} lacks 'from' or 'value'")
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"turn {k}: unknown role {turn['from']!r} (known: {', '.join(ROLES)})")
        if not isinstance(turn["value"], str):
            raise ValueError(f"turn {k}: value is not a string")
        if has_lone_surrogate(turn["value"]):
            raise ValueError(f"{NOT_UTF8} in turn {k}")
        messages.append({"role": role, "content": turn["value"]})
    images = _media(sample.get("image"), "image", image_dir, out_dir)
    videos = _media(sample.get("video"), "video", image_dir, out_dir)
    for tag, found, what in ((IMAGE_TAG, images, "images"), (VIDEO_TAG, videos, "videos")):
        tags = sum(m["content"].count(tag) for m in messages)
        if tags != len(found):
            raise ValueError(f"{tags} {tag} tags for {len(found)} {what}")
    out = {"messages": messages, "images": images}
    if videos:
        out["videos"] = videos
    if "id" in sample:
        out = {"id": sample["id"], **out}
    return out


def llava_to_mllm(
    input: str | os.PathLike, output: str | os.PathLike, image_dir: str | os.PathLike | None = None,
    strict: bool = False,
) -> ConversionReport:
    """Convert; write `output` atomically. With strict=True a skipped sample raises ValueError (nothing
    written). Returns the report (kept count, skipped (id, reason) pairs)."""
    from tqdm import tqdm

    records = read_records(input)
    if not isinstance(records, list):
        raise ValueError(f"{input}: expected a json list of LLaVA samples")
    image_root = Path(image_dir) if image_dir is not None else Path(input).parent
    if not image_root.is_dir():
        raise FileNotFoundError(f"--image-dir {image_root}: no such directory")
    out_path = Path(output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    report, converted = ConversionReport(), []
    for i, sample in enumerate(tqdm(records, desc="llava-to-mllm", unit="sample", disable=len(records) < 5000)):
        try:
            converted.append(convert_sample(sample, image_root, out_path.parent))
        except ValueError as e:
            named = isinstance(sample, dict) and "id" in sample and not has_lone_surrogate(sample["id"])
            name = f"id {sample['id']}" if named else f"index {i}"
            report.skipped.append((name, str(e)))
    report.kept = len(converted)
    report.outside = sum(any(p.startswith("../") for p in s["images"] + s.get("videos", [])) for s in converted)
    if strict and report.skipped:
        name, reason = report.skipped[0]
        raise ValueError(f"{input}: {len(report.skipped)} samples cannot be converted, first {name}: {reason}")
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_text(json.dumps(converted, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out_path)
    return report
