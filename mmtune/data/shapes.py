"""The embedded default data set: 56x56 images of one coloured shape, with LLaVA-format questions.

`make_shapes(out_dir, num, seed)` writes out_dir/images/NNNNNN.png and out_dir/llava_format.json
(LLaVA-Instruct style: id, image "images/NNNNNN.png", conversations human/gpt with "<image>\\n" in the
first question). Questions ask the colour ("red") or the shape ("circle"); about 30% of the image samples
ask both (two turns); about 10% of all samples are text-only, with answers readable from the question
("Name the color in: a red circle." -> "red"). Everything follows from `seed`.

`make_shapes(..., videos=N)` adds N video samples after them (their own random stream, so the image
samples stay the same): out_dir/videos/NNNNNN.mp4, 8 frames at 4 fps (2 s, so 4 frames = 2 temporal
patches at the processor's 2 fps) of one shape moving left, right, up or down, with "<video>\nWhich way
does the shape move?" -> the direction; about 30% ask the colour as a second turn. The answer needs more
than one frame.

`eval_questions(num, seed)` gives held-out (PIL image, question, answer) triples for greedy-answer
accuracy; it draws from a different random stream than `make_shapes`, so the images are new.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

IMAGE_SIZE = 56
BACKGROUND = (32, 32, 32)
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
COLOR_QUESTION = "What color is the shape?"
SHAPE_QUESTION = "What shape is this?"
MOVE_QUESTION = "Which way does the shape move?"
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VIDEO_FRAMES, VIDEO_FPS = 8, 4
_EVAL_STREAM = 0x5EED_E7A1  # xor-ed into the seed so eval images never repeat training ones
_VIDEO_STREAM = 0x71DE_0005  # the video samples' own stream


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    cx: int
    cy: int
    radius: int


def random_spec(rng: random.Random) -> ShapeSpec:
    """A large, roughly centred shape (radius 16-22 px, centre within 3 px of the middle): at 56x56 the
    image is 4x4 patches, and smaller shapes anywhere in the frame are not separable by a tiny vision
    tower in minutes (measured: chance-level shape accuracy after 2000 steps with radius 8-18 anywhere,
    0.99 after 400 steps with this spec)."""
    radius = rng.randint(16, 22)
    mid = IMAGE_SIZE // 2
    return ShapeSpec(
        color=rng.choice(list(COLORS)),
        shape=rng.choice(SHAPES),
        cx=mid + rng.randint(-3, 3),
        cy=mid + rng.randint(-3, 3),
        radius=radius,
    )


def draw(spec: ShapeSpec) -> Image.Image:
    """The 56x56 RGB image of one shape on a plain background."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    d = ImageDraw.Draw(img)
    fill, x, y, r = COLORS[spec.color], spec.cx, spec.cy, spec.radius
    if spec.shape == "circle":
        d.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif spec.shape == "square":
        s = int(r * 0.8)
        d.rectangle((x - s, y - s, x + s, y + s), fill=fill)
    elif spec.shape == "triangle":
        d.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    else:  # cross
        w = max(2, r // 3)
        d.rectangle((x - r, y - w, x + r, y + w), fill=fill)
        d.rectangle((x - w, y - r, x + w, y + r), fill=fill)
    return img


def _sample(i: int, rng: random.Random) -> tuple[dict, Image.Image | None]:
    spec = random_spec(rng)
    sample_id = f"shapes_{i:06d}"
    if rng.random() < 0.1:  # text-only: the answer is in the question
        which = rng.choice(("color", "shape"))
        article = "an" if spec.color[0] in "aeiou" else "a"
        q = f"Name the {which} in: {article} {spec.color} {spec.shape}."
        a = spec.color if which == "color" else spec.shape
        return {"id": sample_id, "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}, None
    qa = [(COLOR_QUESTION, spec.color), (SHAPE_QUESTION, spec.shape)]
    rng.shuffle(qa)
    if rng.random() >= 0.3:
        qa = qa[:1]
    turns = []
    for k, (q, a) in enumerate(qa):
        turns += [{"from": "human", "value": ("<image>\n" + q) if k == 0 else q}, {"from": "gpt", "value": a}]
    sample = {"id": sample_id, "image": f"images/{i:06d}.png", "conversations": turns}
    return sample, draw(spec)


def moving_frames(spec: ShapeSpec, direction: str, n: int = VIDEO_FRAMES) -> list:
    """n RGB frames [56, 56, 3] of the shape travelling 24 px through the centre in `direction`."""
    import numpy as np

    dx, dy = DIRECTIONS[direction]
    frames = []
    for k in range(n):
        step = round(-12 + 24 * k / (n - 1))
        moved = ShapeSpec(spec.color, spec.shape, IMAGE_SIZE // 2 + dx * step, IMAGE_SIZE // 2 + dy * step, spec.radius)
        frames.append(np.asarray(draw(moved)))
    return frames


def _video_sample(j: int, rng: random.Random) -> tuple[dict, list]:
    spec = ShapeSpec(rng.choice(list(COLORS)), rng.choice(SHAPES), 0, 0, rng.randint(9, 12))
    direction = rng.choice(list(DIRECTIONS))
    turns = [{"from": "human", "value": "<video>\n" + MOVE_QUESTION}, {"from": "gpt", "value": direction}]
    if rng.random() < 0.3:
        turns += [{"from": "human", "value": COLOR_QUESTION}, {"from": "gpt", "value": spec.color}]
    sample = {"id": f"shapes_video_{j:06d}", "video": f"videos/{j:06d}.mp4", "conversations": turns}
    return sample, moving_frames(spec, direction)


def make_shapes(out_dir: str | os.PathLike, num: int = 2000, seed: int = 0, videos: int = 0) -> Path:
    """Write `num` image/text samples and `videos` video samples to out_dir (images/*.png, videos/*.mp4,
    llava_format.json); returns the json path."""
    if num < 1:
        raise ValueError(f"make-shapes: --num must be >= 1, got {num}")
    if videos < 0:
        raise ValueError(f"make-shapes: --videos must be >= 0, got {videos}")
    from tqdm import tqdm

    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in tqdm(range(num), desc="make-shapes", unit="sample", disable=num < 500):
        sample, img = _sample(i, rng)
        if img is not None:
            img.save(out / sample["image"], format="PNG")
        samples.append(sample)
    if videos:
        from mmtune.data.video import write_video

        vrng = random.Random(seed ^ _VIDEO_STREAM)
        for j in tqdm(range(videos), desc="make-shapes videos", unit="video", disable=videos < 200):
            sample, frames = _video_sample(j, vrng)
            write_video(out / sample["video"], frames, VIDEO_FPS)
            samples.append(sample)
    path = out / "llava_format.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(samples, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def eval_questions(num: int, seed: int = 0) -> list[tuple[Image.Image, str, str]]:
    """`num` held-out (image, question, answer) triples; half colour and half shape questions."""
    rng = random.Random(seed ^ _EVAL_STREAM)
    out = []
    for i in range(num):
        spec = random_spec(rng)
        q, a = (COLOR_QUESTION, spec.color) if i % 2 == 0 else (SHAPE_QUESTION, spec.shape)
        out.append((draw(spec), q, a))
    return out
