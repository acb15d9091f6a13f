"""`mmtune generate`: answer a prompt (with images) from an HF model dir or a training checkpoint, with
any GLM-V architecture (config.json's `model_type`, mmtune.models).

The prompt is rendered with the tokenizer's own chat template (`apply_chat_template`, with
`enable_thinking` as the data pipeline's data.json sets it; the recipe uses false), images go through
the data pipeline's `ImageProcessor`, each `<|image|>` is expanded to t*h*w/4 placeholder ids, and
mmtune's model decodes with its KV cache: greedy by default, sampling with --temperature > 0, until
one of the config's eos ids (`<|endoftext|>`, `<|user|>`, `<|observation|>`) or --max-new-tokens.

Images are placed where the prompt says `<image>` (the MLLM data format); a prompt without the tag
gets `<image>\\n` per image in front, as the LLaVA conversion writes its first question.

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

import torch
from torch import nn

from mmtune.models import architecture_of, load_config

IMAGE_TAG = "<image>"


@dataclass
class Generation:
    text: str  # the decoded answer (special tokens dropped, stripped)
    token_ids: list[int]  # generated ids, the stopping eos id included when one was produced
    prompt_ids: list[int]  # the prompt after image expansion
    stopped_on_eos: bool


# ---- prompt -------------------------------------------------------------------------------------
def build_messages(prompt: str, num_images: int, system: str | None = None) -> list[dict]:
    """One user turn in the chat template's content-list form; `<image>` tags become image parts."""
    tags = prompt.count(IMAGE_TAG)
    if tags == 0 and num_images:
        prompt = (IMAGE_TAG + "\n") * num_images + prompt
    elif tags != num_images:
        raise ValueError(f"the prompt has {tags} {IMAGE_TAG} tag(s) but {num_images} image(s) were given; "
                         f"use one tag per --image, or none (images then go first)")
    content: list[dict] = []
    for i, piece in enumerate(prompt.split(IMAGE_TAG)):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def encode_prompt(tokenizer, messages: list[dict], image_tokens: list[int], image_token_id: int,
                  enable_thinking: bool = False) -> list[int]:
    """Prompt ids with the generation prompt; the i-th `<|image|>` expanded to image_tokens[i] copies."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                         enable_thinking=enable_thinking)
    ids = tokenizer.encode(text, add_special_tokens=False)
    out, k = [], 0
    for t in ids:
        if t == image_token_id:
            if k >= len(image_tokens):
                raise ValueError(f"the rendered prompt has more image placeholders than the {len(image_tokens)} images")
            out.extend([t] * image_tokens[k])
            k += 1
        else:
            out.append(t)
    if k != len(image_tokens):
        raise ValueError(f"the rendered prompt has {k} image placeholder(s) for {len(image_tokens)} image(s); "
                         "does the tokenizer's chat template render {'type': 'image'} parts?")
    return out


# ---- decoding -----------------------------------------------------------------------------------
def eos_ids(config) -> set[int]:
    eos = config.text.eos_token_id
    return set(eos if isinstance(eos, list) else [eos] if eos is not None else [])


@torch.no_grad()
def generate_ids(model: nn.Module, prompt_ids: list[int], *,
                 pixel_values: torch.Tensor | None = None, image_grid_thw: torch.Tensor | None = None,
                 max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 stop_ids: set[int] | None = None, generator: torch.Generator | None = None) -> tuple[list[int], bool]:
    """Decode from `prompt_ids` with the KV cache: one prefill, then one token per forward.
    Returns (new ids, stopped on an eos id)."""
    device = next(model.parameters()).device
    stop_ids = eos_ids(model.config) if stop_ids is None else stop_ids
    ids_1S = torch.tensor([prompt_ids], device=device)
    if pixel_values is not None:
        pixel_values = pixel_values.to(device=device, dtype=next(model.model.visual.parameters()).dtype)
        image_grid_thw = image_grid_thw.to(device)
    out = model(ids_1S, pixel_values=pixel_values, image_grid_thw=image_grid_thw, use_cache=True)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits_V = out.logits[0, -1].float()
        nxt = _pick(logits_V, temperature, top_p, generator)
        new.append(nxt)
        if nxt in stop_ids:
            return new, True
        out = model(torch.tensor([[nxt]], device=device), past_key_values=out.past_key_values, use_cache=True)
    return new, False


def _pick(logits_V: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> int:
    if temperature <= 0:
        return int(logits_V.argmax())
    probs = torch.softmax(logits_V / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < top_p  # the smallest set whose mass reaches top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def generate(model: nn.Module, tokenizer, prompt: str, images=(), *, image_processor=None,
             max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0, enable_thinking: bool = False,
             system: str | None = None, seed: int = 0) -> Generation:
    """Answer `prompt` about `images` (PIL images): chat template, image preprocessing, cached decoding."""
    prompt_ids, pixel_values, grid = _prepare(model, tokenizer, prompt, list(images), image_processor,
                                              enable_thinking, system)
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    new, stopped = generate_ids(model, prompt_ids, pixel_values=pixel_values, image_grid_thw=grid,
                                max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=gen)
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return Generation(text, new, prompt_ids, stopped)


def _prepare(model, tokenizer, prompt: str, images: list, image_processor, enable_thinking: bool,
             system: str | None) -> tuple[list[int], torch.Tensor | None, torch.Tensor | None]:
    """(prompt ids with images expanded, pixel_values, image_grid_thw) of one request."""
    pixel_values = grid = None
    image_tokens: list[int] = []
    if images:
        if image_processor is None:
            raise ValueError("images given without an image_processor (mmtune.data.images.ImageProcessor)")
        pv, g = image_processor.process(images)
        pixel_values, grid = torch.from_numpy(pv), torch.from_numpy(g)
        merge = model.config.vision.spatial_merge_size ** 2
        image_tokens = [int(t * h * w) // merge for t, h, w in g.tolist()]
    messages = build_messages(prompt, len(images), system)
    ids = encode_prompt(tokenizer, messages, image_tokens, model.config.image_token_id, enable_thinking)
    return ids, pixel_values, grid


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
    B, L = len(prepared), max(len(ids) for ids, _, _ in prepared)
    pad = model.config.text.pad_token_id or 0
    ids_BL = torch.full((B, L), pad, dtype=torch.long)
    mask_BL = torch.zeros(B, L, dtype=torch.long)
    for b, (ids, _, _) in enumerate(prepared):
        ids_BL[b, L - len(ids):] = torch.tensor(ids)
        mask_BL[b, L - len(ids):] = 1
    pvs = [pv for _, pv, _ in prepared if pv is not None]
    grids = [g for _, _, g in prepared if g is not None]
    pixel_values = torch.cat(pvs).to(device=device, dtype=next(model.model.visual.parameters()).dtype) if pvs else None
    grid = torch.cat(grids).to(device) if grids else None
    out = model(ids_BL.to(device), pixel_values=pixel_values, image_grid_thw=grid,
                attention_mask=mask_BL.to(device), use_cache=True)
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
    return [Generation(tokenizer.decode(n, skip_special_tokens=True).strip(), n, ids, d)
            for n, (ids, _, _), d in zip(new, prepared, done)]


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


def load_model(model_path: str | Path, *, hf_dir: str | Path | None = None, device: str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Path]:
    """(model in eval mode, the HF dir holding its tokenizer and processor) from an HF dir or a training
    checkpoint (see the module docstring)."""
    path = Path(model_path)
    if not path.exists():
        raise FileNotFoundError(f"--model {path}: no such file or directory")
    ckpt = resolve_checkpoint(path)
    if ckpt is None:
        model = architecture_of(path).model_class.from_pretrained(path, dtype=dtype, device=device)
        return model.eval(), path
    hf = Path(hf_dir) if hf_dir else _hf_dir_of_run(ckpt)
    if hf is None or not (hf / "config.json").is_file():
        raise FileNotFoundError(f"--model {path} is a DCP checkpoint, which holds no config or tokenizer: pass "
                                f"--hf-dir (the HF dir it was trained from){f'; {hf} has no config.json' if hf else ''}")
    arch, config = load_config(hf)
    with torch.device("meta"):
        model = arch.model_class(config)
    model.to_empty(device="cpu")
    load_dcp_weights(model, ckpt)
    model.to(dtype)
    for name, module in model.named_modules():  # the router stays fp32, as from_pretrained keeps it
        if name.endswith("mlp.gate"):
            module.float()
    return model.to(device).eval(), hf


def load_tokenizer(hf_dir: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(hf_dir))


# ---- command line -------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtune generate",
        description="Answer a prompt (optionally about images) with a GLM-V model (GLM-4.5V / GLM-4.6V or the dense "
                    "GLM-4.1V / GLM-4.6V-Flash, as its config.json says): an HF dir, "
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
    ap.add_argument("--prompt", required=True, help="the user message; may contain <image> tags")
    ap.add_argument("--system", default=None, help="an optional system message")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="stop after this many new tokens (default 128)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0 (default): greedy; > 0: sample from softmax(logits / temperature)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass with --temperature > 0 (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    ap.add_argument("--enable-thinking", action="store_true",
                    help="render the prompt with thinking on (the model writes <think>...); default off, as the "
                         "recipe's data.json (enable_thinking: false) trains it")
    ap.add_argument("--image-max-pixels", type=int, default=None,
                    help="pre-resize images above this many pixels, as data.json's image_max_pixels (default: "
                         "only the model's preprocessor_config.json limits)")
    ap.add_argument("--image-min-pixels", type=int, default=None, help="as data.json's image_min_pixels")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default=None, help="default: bf16 on cuda, fp32 on cpu")
    args = ap.parse_args(argv)
    if args.max_new_tokens < 1:
        ap.error("--max-new-tokens must be >= 1")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: torch sees no CUDA device (install a CUDA build of torch, or use --device cpu)")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if device == "cuda" else "fp32")]

    from mmtune.data.images import ImageProcessor, open_image

    t0 = time.perf_counter()
    model, hf = load_model(args.model, hf_dir=args.hf_dir, device=device, dtype=dtype)
    tokenizer = load_tokenizer(hf)
    images = [open_image(p).convert("RGB") for p in args.image]
    improc = ImageProcessor.from_pretrained(hf, image_min_pixels=args.image_min_pixels,
                                            image_max_pixels=args.image_max_pixels) if images else None
    t1 = time.perf_counter()
    result = generate(model, tokenizer, args.prompt, images, image_processor=improc,
                      max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                      enable_thinking=args.enable_thinking, system=args.system, seed=args.seed)
    t2 = time.perf_counter()
    print(result.text)
    print(f"[{len(result.prompt_ids)} prompt + {len(result.token_ids)} new tokens, "
          f"{'eos' if result.stopped_on_eos else 'max-new-tokens'}; load {t1 - t0:.1f}s, generate {t2 - t1:.2f}s "
          f"on {device}]", file=sys.stderr)
    return 0
