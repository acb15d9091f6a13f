"""`mmtune generate`: answer a prompt (with images and videos) from an HF model dir or a training checkpoint,
with any GLM-V architecture (config.json's `model_type`, mmtune.models).

The prompt is rendered with the tokenizer's own chat template (`apply_chat_template`, with
`enable_thinking` as the data pipeline's data.json sets it; the recipe uses false), images go through
the data pipeline's `ImageProcessor` and videos through its `VideoProcessor` (docs/GLM45V.md section 7),
each `<|image|>` is expanded to t*h*w/4 placeholder ids and each `<|video|>` to its frames and
timestamps as the processor does, and
mmtune's model decodes with its KV cache: greedy by default, sampling with --temperature > 0, until
one of the config's eos ids (`<|endoftext|>`, `<|user|>`, `<|observation|>`) or --max-new-tokens.

Images are placed where the prompt says `<image>` (the MLLM data format); a prompt without the tag
gets `<image>\\n` per image in front, as the LLaVA conversion writes its first question. Videos likewise
with `<video>` (in front of the images when untagged).

Model sources:
- an HF dir (config.json + safetensors, hub or merged layout);
- a training run: `<save>` (its latest_checkpointed_iteration.txt), `<save>/iter_XXXXXXX`, or a
  converted weights-only DCP. A DCP holds weights only: config, tokenizer and processor come from
  --hf-dir, else from the run's model.json (`init_from_hf_path`) that `mmtune train` copies into <save>.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mmtune.config_files import DTYPE_NAMES
from mmtune.models import architecture_for_config, architecture_of, load_config

IMAGE_TAG = "<image>"
VIDEO_TAG = "<video>"


@dataclass
class Generation:
    text: str  # the decoded answer (special tokens dropped, stripped)
    token_ids: list[int]  # generated ids, the stopping eos id included when one was produced
    prompt_ids: list[int]  # the prompt after image expansion
    stopped_on_eos: bool


# ---- prompt -------------------------------------------------------------------------------------
def build_messages(prompt: str, num_images: int, system: str | None = None, num_videos: int = 0) -> list[dict]:
    """One user turn in the chat template's content-list form; `<image>` / `<video>` tags become image /
    video parts (untagged media go first: videos, then images)."""
    for tag, n, flag in ((IMAGE_TAG, num_images, "--image"), (VIDEO_TAG, num_videos, "--video")):
        tags = prompt.count(tag)
        if tags == 0 and n:
            prompt = (tag + "\n") * n + prompt
        elif tags != n:
            what = "image" if tag == IMAGE_TAG else "video"
            raise ValueError(f"the prompt has {tags} {tag} tag(s) but {n} {what}(s) were given; use one tag per "
                             f"{flag}, or none ({what}s then go first)")
    content: list[dict] = []
    for piece in prompt.replace(VIDEO_TAG, "\0video\0").replace(IMAGE_TAG, "\0image\0").split("\0"):
        if piece in ("image", "video"):
            content.append({"type": piece})
        elif piece:
            content.append({"type": "text", "text": piece})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def encode_prompt(tokenizer, messages: list[dict], image_tokens: list[int], image_token_id: int,
                  enable_thinking: bool = False, videos: list = ()) -> list[int]:
    """Prompt ids with the generation prompt; the i-th `<|image|>` expanded to image_tokens[i] copies and
    the j-th `<|video|>` to videos[j] (a data.template.VideoTokens), as the processor expands them."""
    from mmtune.data.template import GlmTemplate

    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    ids = tokenizer.encode(text, add_special_tokens=False)
    template = GlmTemplate(tokenizer)
    assert template.image_id == image_token_id, (template.image_id, image_token_id)
    try:
        return template.expand(ids, list(image_tokens), list(videos))
    except ValueError as e:
        raise ValueError(f"the rendered prompt does not match the {len(image_tokens)} image(s) and {len(videos)} "
                         f"video(s) ({e}); does the tokenizer's chat template render {{'type': 'image'}} and "
                         "{'type': 'video'} parts?") from None


# ---- decoding -----------------------------------------------------------------------------------
def eos_ids(config) -> set[int]:
    eos = config.text.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list[int], *,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop_ids: set[int] | None = None, generator: torch.Generator | None = None,
                 pixel_values_videos: torch.Tensor | None = None,
                 video_grid_thw: torch.Tensor | None = None) -> tuple[list[int], bool]:
    """Decode from `prompt_ids` with the KV cache: one prefill, then one token per forward.
    Returns (new ids, stopped on an eos id)."""
    device = next(model.parameters()).device
    stop_ids = eos_ids(model.config) if stop_ids is None else stop_ids
    ids_1S = torch.tensor([prompt_ids], device=device)
    vision = _vision_inputs(model, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
    out = model(ids_1S, use_cache=True, **vision)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_V = out.logits[0, -1].float()
        nxt = _pick(logits_V, temperature, top_p, generator)
        new.append(nxt)
        if nxt in stop_ids:
            return new, True
        out = model(torch.tensor([[nxt]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return new, False


def _vision_inputs(model, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw) -> dict:
    """The model's image/video keyword arguments on its device and vision dtype (absent ones left out)."""
    device = next(model.parameters()).device
    dtype = next(model.model.visual.parameters()).dtype
    out = {}
    for key, px, gkey, grid in (("pixel_values", pixel_values, "image_grid_thw", image_grid_thw),
                                ("pixel_values_videos", pixel_values_videos, "video_grid_thw", video_grid_thw)):
        if px is not None:
            out[key], out[gkey] = px.to(device=device, dtype=dtype), grid.to(device)
    return out


def _pick(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        keep[0] = True  # and never empty (top_p <= 0 from a caller keeps the most likely token)
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(model: nn.Module, tokenizer, prompt: str, images=(), *, image_processor=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, enable_thinking: bool = False,
             system: str | None = None, seed: int = 0, videos=(), video_processor=None) -> Generation:
    """Answer `prompt` about `images` (PIL images) and `videos` (video files): chat template, image and
    video preprocessing, cached decoding."""
    p = _prepare(model, tokenizer, prompt, list(images), image_processor, enable_thinking, system, list(videos),
                 video_processor)
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    new, stopped = generate_ids(model, p.ids, pixel_values=p.pixel_values, image_grid_thw=p.image_grid_thw,
                                pixel_values_videos=p.pixel_values_videos, video_grid_thw=p.video_grid_thw,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=gen)
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Generation(text, new, p.ids, stopped)


@dataclass
class _Prepared:
    ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None


def _prepare(model, tokenizer, prompt: str, images: list, image_processor, enable_thinking: bool,
             system: str | None, videos: list = (), video_processor=None) -> _Prepared:
    """Prompt ids with images and videos expanded, and their pixel rows and grids, of one request."""
    from mmtune.data.template import VideoTokens

    out = _Prepared([])
    image_tokens: list[int] = []
    if images:
        if image_processor is None:
            raise ValueError("images given without an image_processor (mmtune.data.images.ImageProcessor)")
        pv, g = image_processor.process(images)
        out.pixel_values, out.image_grid_thw = torch.from_numpy(pv), torch.from_numpy(g)
        merge = model.config.vision.spatial_merge_size ** 2
        image_tokens = [int(t * h * w) // merge for t, h, w in g.tolist()]
    video_tokens = []
    if videos:
        if video_processor is None:
            raise ValueError("videos given without a video_processor (mmtune.data.video.VideoProcessor)")
        rows, grids = [], []
        for path in videos:
            r, plan = video_processor.process(path)
            rows.append(r)
            grids.append(list(plan.grid))
            video_tokens.append(VideoTokens(video_processor.frame_tokens(plan.grid), plan.timestamps))
        out.pixel_values_videos, out.video_grid_thw = torch.from_numpy(np.concatenate(rows)), torch.tensor(grids)
    messages = build_messages(prompt, len(images), system, len(videos))
    out.ids = encode_prompt(tokenizer, messages, image_tokens, model.config.image_token_id, enable_thinking,
                            video_tokens)
    return out


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer, requests: list[tuple[str, list]], *,
                   image_processor=None, max_new_tokens: int = 64, enable_thinking: bool = False,
                   system: str | None = None) -> list[Generation]:
    """Greedy answers to many (prompt, images) requests at once: prompts left-padded into one batch
    (attention mask), one prefill, then one forward per new token for all rows until every row has
    produced an eos id. Same answers as `generate` one by one."""
    if not requests:
        return []
    device = next(model.parameters()).device
    stop_ids = eos_ids(model.config)
    prepared = [_prepare(model, tokenizer, p, list(imgs), image_processor, enable_thinking, system)
                for p, imgs in requests]
    B, L = len(prepared), max(len(p.ids) for p in prepared)
    pad = model.config.text.pad_token_id or 0
    ids_BL = torch.full((B, L), pad, dtype=torch.long)
    mask_BL = torch.zeros(B, L, dtype=torch.long)
    for b, p in enumerate(prepared):
        ids_BL[b, L - len(p.ids):] = torch.tensor(p.ids)
        mask_BL[b, L - len(p.ids):] = 1
    pvs = [p.pixel_values for p in prepared if p.pixel_values is not None]
    grids = [p.image_grid_thw for p in prepared if p.image_grid_thw is not None]
    vision = _vision_inputs(model, torch.cat(pvs) if pvs else None, torch.cat(grids) if grids else None, None, None)
    out = model(ids_BL.to(device), attention_mask=mask_BL.to(device), use_cache=True, **vision)
    new: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    for _ in range(max_new_tokens):
        nxt_B = out.logits[:, -1].float().argmax(-1).tolist()
        for b, t in enumerate(nxt_B):
            if not done[b]:
                new[b].append(t)
                done[b] = t in stop_ids
        if all(done):
            break
        step_ids = torch.tensor([[t if not d else pad] for t, d in zip(nxt_B, done)], device=device)
        out = model(step_ids, attention_mask=torch.ones(B, 1, dtype=torch.long, device=device),
                    past_key_values=out.past_key_values, use_cache=True)
    return [Generation(tokenizer.decode(n, skip_special_tokens=True).strip(), n, p.ids, d)
            for n, p, d in zip(new, prepared, done)]


# ---- loading ------------------------------------------------------------------------------------
def resolve_checkpoint(path: Path) -> Path | None:
    """The DCP dir of a training run (<save> via its pointer file, or an iter dir / DCP), or None for an
    HF dir."""
    from mmtune.convert.dcp_io import LATEST_FILE, METADATA_FILE, resolve_dcp_dir

    if (path / METADATA_FILE).is_file() or (path / LATEST_FILE).is_file():
        return resolve_dcp_dir(path)
    return None


def _hf_dir_of_run(ckpt: Path) -> Path | None:
    """init_from_hf_path of the model.json that `mmtune train` copied next to the checkpoints."""
    for run in (ckpt.parent, ckpt):
        mj = run / "model.json"
        if mj.is_file():
            hf = json.loads(mj.read_text()).get("init_from_hf_path")
            if hf:
                return Path(hf)
    return None


def load_dcp_weights(model: torch.nn.Module, ckpt: Path) -> None:
    """Load the model weights of a DCP into a plain (unsharded) model. Training checkpoints keep them
    under `mmtune.convert.dcp_io.MODEL_PREFIX`, converted weights-only DCPs under the bare native names."""
    import torch.distributed.checkpoint as dcp

    from mmtune.convert.dcp_io import model_prefix, read_metadata

    metadata = read_metadata(ckpt)
    prefix = model_prefix(metadata)
    sd = model.state_dict()
    missing = sorted(k for k in sd if prefix + k not in metadata.state_dict_metadata)
    if missing:
        raise ValueError(f"{ckpt}: the DCP lacks {len(missing)} model tensor(s), e.g. {missing[:3]} "
                         "(is it a checkpoint of this model? check --hf-dir / the run's model.json)")
    flat = {prefix + k: v for k, v in sd.items()}
    dcp.load(flat, checkpoint_id=str(ckpt), no_dist=True)
    model.load_state_dict({k: flat[prefix + k] for k in sd})


def cuda_devices(config, dtype: torch.dtype, free: list[int] | None = None) -> list[str]:
    """The CUDA device of each placement unit (mmtune/placement.py): all "cuda:0" when the model fits one
    GPU, else its layers over the visible GPUs in order; ValueError before loading when it does not fit.
    `free`: free bytes per GPU (default: what CUDA reports)."""
    from mmtune.placement import cuda_free_memory, plan_devices, unit_bytes

    with torch.device("meta"):
        model = architecture_for_config(config).model_class(config)
    _cast(model, dtype)
    gpus = plan_devices(unit_bytes(model), cuda_free_memory() if free is None else free,
                        what=f"the model in {str(dtype).removeprefix('torch.')}")
    return [f"cuda:{i}" for i in gpus]


def _cast(model: torch.nn.Module, dtype: torch.dtype) -> None:
    model.to(dtype)
    for name, module in model.named_modules():  # the router stays fp32, as from_pretrained keeps it
        if name.endswith("mlp.gate"):
            module.float()


def load_model(model_path: str | Path, *, hf_dir: str | Path | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Path]:
    """(model in eval mode, the HF dir holding its tokenizer and processor) from an HF dir or a training
    checkpoint (see the module docstring). `device="cuda"`: one GPU, or the layers over all visible GPUs
    when it needs more (`cuda_devices`)."""
    from mmtune.models.glm4v_moe.loading import load_pretrained
    from mmtune.placement import place

    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such file or directory")
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        devices = cuda_devices(load_config(path)[1], dtype) if device == "cuda" else [device]
        if len(set(devices)) > 1:
            model = load_pretrained(architecture_of(path).model_class, path, dtype=dtype,
                                    place=lambda m: place(m, devices, materialize=True))
        else:
            model = architecture_of(path).model_class.from_pretrained(path, dtype=dtype, device=devices[0])
        return model.eval(), path
    hf = Path(hf_dir) if hf_dir else _hf_dir_of_run(ckpt)
    if hf is None or not (hf / "config.json").is_file():
        raise FileNotFoundError(f"--model {path} is a DCP checkpoint, which holds no config or tokenizer: pass "
                                f"--hf-dir (the HF dir it was trained from){f'; {hf} has no config.json' if hf else ''}")
    from mmtune.convert.lora_export import lora_info

    lora = lora_info(ckpt)
    if lora is not None:  # adapters only: the base from the HF dir, the adapters merged in
        model = architecture_of(hf).model_class.from_pretrained(hf, dtype=torch.float32, device="cpu")
        _merge_lora(ckpt, lora, model)
        _cast(model, dtype)
        return model.to(device).eval(), hf
    arch, config = load_config(hf)
    devices = cuda_devices(config, dtype) if device == "cuda" else [device]
    with torch.device("meta"):
        model = arch.model_class(config)
    model.to_empty(device="cpu")
    load_dcp_weights(model, ckpt)
    _cast(model, dtype)
    if len(set(devices)) > 1:
        return place(model, devices).eval(), hf
    return model.to(devices[0]).eval(), hf


@torch.no_grad()
def _merge_lora(ckpt: Path, info: dict, model) -> None:
    """Fold a LoRA checkpoint's adapters into `model` (its base, fp32): W + alpha/r B A; its other tensors
    (the routers' biases) replace the base's."""
    from mmtune.convert.dcp_io import load_tensors, model_tensors, read_metadata
    from mmtune.convert.lora_export import adapter_pairs
    from mmtune.ops.lora import lora_delta

    tensors = model_tensors(read_metadata(ckpt))
    loaded = load_tensors(ckpt, {key: md for key, md in tensors.values()})
    by_name = {name: loaded[key] for name, (key, _) in tensors.items()}
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    scale = float(info["alpha"]) / int(info["r"])
    for base, (a, b) in adapter_pairs(ckpt, info).items():
        params[base].add_(lora_delta(by_name.pop(a).float(), by_name.pop(b).float(), scale).to(params[base].dtype))
    for name, tensor in by_name.items():
        params[name].copy_(tensor)


def load_tokenizer(hf_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtune generate",
        description="Answer a prompt (optionally about images and videos) with a GLM-V model (GLM-4.5V / GLM-4.6V "
                    "or the dense GLM-4.1V / GLM-4.6V-Flash, as its config.json says): an HF dir, "
                    "a training run's save dir, an iter_XXXXXXX checkpoint or a converted DCP.",
    )
    ap.add_argument("--model", required=True,
                    help="HF model dir, or a training checkpoint (<save>, <save>/iter_XXXXXXX, or a DCP dir)")
    ap.add_argument("--hf-dir", default=None,
                    help="for a checkpoint: the HF dir with config.json, tokenizer and processor (default: "
                         "init_from_hf_path of the run's model.json)")
    ap.add_argument("--image", action="append", default=[],
                    help="an image file; repeat for several, placed at the prompt's <image> tags in order "
                         "(without tags, in front of the prompt)")
    ap.add_argument("--video", action="append", default=[],
                    help="a video file; repeat for several, placed at the prompt's <video> tags in order (without "
                         "tags, in front of the prompt, before the images)")
    ap.add_argument("--prompt", required=True, help="the user message; may contain <image> and <video> tags")
    ap.add_argument("--system", default=None, help="an optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 (default): greedy; > 0: sample from softmax(logits / temperature)")
    ap.add_argument("--top-p", type=float, default=1.0,
                    help="nucleus sampling mass with --temperature > 0, in (0, 1] (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--enable-thinking", action="store_true",
                    help="render the prompt with thinking on (the model writes <think>...); default off, as the "
                         "recipe's data.json (enable_thinking: false) trains it")
    ap.add_argument("--image-max-pixels", type=int, default=None,
                    help="pre-resize images above this many pixels, as data.json's image_max_pixels (default: "
                         "only the model's preprocessor_config.json limits)")
    ap.add_argument("--image-min-pixels", type=int, default=None, help="as data.json's image_min_pixels")
    ap.add_argument("--video-fps", type=float, default=None,
                    help="frames sampled per second, as data.json's video_fps (default: the processor's, 2; "
                         "GLM-4.6V processors choose it by duration)")
    ap.add_argument("--video-maxlen", type=int, default=None, help="at most this many frames per video, as "
                    "data.json's video_maxlen (default: no cap)")
    ap.add_argument("--video-max-pixels", type=int, default=None,
                    help="pre-resize video frames above this many pixels, as data.json's video_max_pixels")
    ap.add_argument("--video-min-pixels", type=int, default=None, help="as data.json's video_min_pixels")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda when available. cuda: one GPU when the model fits, else its layers in order "
                         "over all visible GPUs (one process); when they cannot hold it, an error says how much "
                         "memory it needs before anything is loaded")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    if not 0 < args.top_p <= 1:
        ap.error(f"--top-p must be in (0, 1] (1: no nucleus cut; greedy is --temperature 0); got {args.top_p}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (install a CUDA build of torch, or use --device cpu)")
    dtype = getattr(torch, DTYPE_NAMES[args.dtype or ("bf16" if device == "cuda" else "fp32")])

    from mmtune.data.images import ImageProcessor, open_image
    from mmtune.data.video import VideoProcessor

    t0 = time.perf_counter()
    try:
        model, hf = load_model(args.model, hf_dir=args.hf_dir, device=device, dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        print(f"mmtune generate: error: {e}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(hf)
    images = [open_image(p).convert("RGB") for p in args.image]
    improc = ImageProcessor.from_pretrained(hf, image_min_pixels=args.image_min_pixels,
                                            image_max_pixels=args.image_max_pixels) if images else None
    for path in args.video:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--video {path}: no such file")
    vidproc = VideoProcessor.from_pretrained(hf, video_fps=args.video_fps, video_maxlen=args.video_maxlen,
                                             video_min_pixels=args.video_min_pixels,
                                             video_max_pixels=args.video_max_pixels) if args.video else None
    t1 = time.perf_counter()
    result = generate(model, tokenizer, args.prompt, images, image_processor=improc,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      enable_thinking=args.enable_thinking, system=args.system, seed=args.seed,
                      videos=args.video, video_processor=vidproc)
    t2 = time.perf_counter()
    print(result.text)
    print(f"[{len(result.prompt_ids)} prompt + {len(result.token_ids)} new tokens, "
          f"{'eos' if result.stopped_on_eos else 'max-new-tokens'}; load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s "
          f"on {', '.join(sorted({str(p.device) for p in model.parameters()}))}]", file=sys.stderr)
    return 0
