"""`mmtune demo`: the whole GLM-4.5V recipe on the CPU, on the embedded default, with no downloads.

Stages (each printed with its time), the recipe's steps on a tiny GLM-4.5V-architecture model (or, with
`--arch glm4v`, a tiny dense GLM-4.1V-architecture one):
  1. make-tiny       a random-weight model dir in hub layout (per-expert tensors, tokenizer, processor)
  2. make-shapes     synthetic VQA in LLaVA format (56x56 images of one coloured shape)
  3. llava-to-mllm   the recipe's data conversion
  4. hf-to-dcp       expert merge (dense: a plain copy) into a DCP checkpoint (what --load reads)
  5. train           `mmtune train` (FSDP2; torchrun with --nproc > 1) on data.json / model.json written
                     into the workdir like the recipe's (the package's mmtune/examples/tiny/)
  6. dcp-to-hf       export of the last checkpoint into WORKDIR/export
  7. evaluate        greedy answers of the exported model on held-out questions (images drawn from a
                     stream the training set never used), accuracy against chance
  8. plot            the loss curve, WORKDIR/loss.png
The last line printed is `accuracy=<float> chance=<float> steps=<int> train_s=<float> total_s=<float>`.

The tiny model starts from random weights, so its vision tower and projector train too (model.json
freeze false). Hyper-parameters: batch 16, AdamW lr 5e-4 with linear warmup and cosine decay, clip 1.0
(docs/PERFORMANCE.md "Design-phase measurements"; lr 2e-3 never leaves chance).

`--lora`: the same recipe with LoRA (`--lora-r`, all-linear: every Linear of the three towers and the routed
experts) on the frozen random base; the export merges the adapters. Adapters need a higher lr
(LORA_LR unless --lr is given; docs/PERFORMANCE.md "LoRA").
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent / "examples" / "tiny"  # shipped in the wheel (package data)
MARKER = ".mmtune_demo"
EVAL_SEED = 10_000  # held-out questions: eval_questions() draws from its own stream, with this seed
LORA_R, LORA_LR = 16, 2e-3  # demo --lora: rank and default lr (docs/PERFORMANCE.md "LoRA")
TINY_NAMES = {"glm4v_moe": "GLM-4.5V-tiny", "glm4v": "GLM-4.1V-tiny"}  # the tiny model's dir name per arch


@dataclass
class DemoSettings:
    workdir: Path
    steps: int = 600
    nproc: int = 1
    num_samples: int = 2000
    num_eval: int = 200
    batch_size: int = 16
    lr: float = 5e-4
    warmup_fraction: float = 0.05
    seed: int = 0
    threads: int = 1
    overwrite: bool = False
    lora_r: int | None = None  # LoRA of this rank (alpha = 2 r) instead of full finetuning
    arch: str = "glm4v_moe"  # config.json model_type of the tiny model (mmtune.models.ARCHITECTURES)
    compile: bool = False  # mmtune train --use-torch-compile


class _Stages:
    """Numbered stages with their wall time."""

    def __init__(self, total: int):
        self.total, self.i, self.times = total, 0, {}

    @contextmanager
    def __call__(self, name: str, what: str):
        self.i += 1
        print(f"\n[{self.i}/{self.total}] {name}: {what}", flush=True)
        t0 = time.perf_counter()
        yield
        self.times[name] = time.perf_counter() - t0
        print(f"[{self.i}/{self.total}] {name} done in {self.times[name]:.1f}s", flush=True)


def _prepare_workdir(workdir: Path, overwrite: bool) -> None:
    if workdir.exists() and any(workdir.iterdir()):
        if not overwrite:
            raise ValueError(f"--workdir {workdir} exists and is not empty; pass --overwrite to replace an earlier "
                             "demo there, or choose a new directory")
        if not (workdir / MARKER).is_file():
            raise ValueError(f"--workdir {workdir} was not made by mmtune demo (no {MARKER} file); refusing to "
                             "delete it with --overwrite")
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / MARKER).write_text("made by mmtune demo\n")


def write_recipe_configs(workdir: Path, hf_dir: Path, data_dir: Path, dataset: str,
                         arch: str = "glm4v_moe") -> tuple[Path, Path]:
    """data.json and model.json of the recipe (the package's mmtune/examples/tiny/) with this workdir's absolute paths; the
    model_ids of architecture `arch` (the chat template stays GLM-4.5V's: the tiny tokenizer's format)."""
    from mmtune.models import get_architecture

    ids = get_architecture(arch).model_ids
    data = json.loads((EXAMPLES / "data.json").read_text())
    dp = data["dataset_param"]
    dp["preprocess_parameters"]["model_name_or_path"] = str(hf_dir)
    dp["basic_parameters"].update(dataset_dir=str(data_dir), dataset=dataset, cache_dir=str(data_dir / "cache_dir"))
    data["dataloader_param"]["collate_param"]["model_name"] = arch
    model = json.loads((EXAMPLES / "model.json").read_text())
    model["init_from_hf_path"] = str(hf_dir)
    model["model_id"] = ids.model[0]
    model["image_encoder"]["vision_encoder"]["model_id"] = ids.vision_encoder[0]
    model["text_decoder"]["model_id"] = ids.text_decoder[0]
    data_json, model_json = workdir / "data.json", workdir / "model.json"
    data_json.write_text(json.dumps(data, indent=4) + "\n")
    model_json.write_text(json.dumps(model, indent=4) + "\n")
    return data_json, model_json


def train_command(s: DemoSettings, data_json: Path, model_json: Path, load: Path, save: Path) -> list[str]:
    """`mmtune train` with the recipe's flags; torchrun for more than one process."""
    if s.batch_size % s.nproc:
        raise ValueError(f"--batch-size {s.batch_size} must be a multiple of --nproc {s.nproc}")
    flags = [
        "--mm-data", str(data_json), "--mm-model", str(model_json), "--load", str(load), "--save", str(save),
        "--micro-batch-size", str(s.batch_size // s.nproc), "--global-batch-size", str(s.batch_size),
        "--train-iters", str(s.steps), "--lr", str(s.lr), "--min-lr", "0", "--lr-decay-style", "cosine",
        "--lr-warmup-fraction", str(s.warmup_fraction), "--weight-decay", "0.0", "--clip-grad", "1.0",
        "--seed", str(s.seed), "--log-interval", str(max(1, s.steps // 30)), "--save-interval", str(s.steps),
        "--seq-length", "256", "--num-workers", "1", "--no-save-optim", "--no-save-rng", "--log-tps",
    ]
    if s.lora_r:
        flags += ["--lora-r", str(s.lora_r), "--lora-alpha", str(2 * s.lora_r)]
    if s.compile:
        flags.append("--use-torch-compile")
    if s.nproc == 1:
        return [sys.executable, "-m", "mmtune", "train", *flags]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(s.nproc),
            "-m", "mmtune", "train", *flags]


def _run_streamed(cmd: list[str], env: dict, log_file: Path) -> None:
    """Run `cmd`, echoing its output live and keeping a copy in `log_file`."""
    with open(log_file, "w") as log, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                                      text=True, env=env, bufsize=1) as proc:
        for line in proc.stdout:
            sys.stdout.write("    " + line)
            sys.stdout.flush()
            log.write(line)
        rc = proc.wait()
    if rc != 0:
        raise RuntimeError(f"`{' '.join(cmd[:6])} ...` failed with exit code {rc}; its output is in {log_file}")


def evaluate(model_dir: Path, num: int, seed: int = EVAL_SEED, image_max_pixels: int | None = None,
             image_min_pixels: int | None = None, progress: bool = True, batch_size: int = 50) -> dict:
    """Greedy answers of the model in `model_dir` (loaded by mmtune) on `num` held-out shapes questions,
    `batch_size` questions per batched generation (`mmtune.generate.generate_batch`). Returns accuracy, chance (expected accuracy of a uniform guess) and the (question, answer, said) rows."""
    from tqdm import tqdm

    from mmtune.data.images import ImageProcessor
    from mmtune.data.shapes import COLOR_QUESTION, COLORS, SHAPES, eval_questions
    from mmtune.generate import generate_batch, load_model, load_tokenizer

    model, hf = load_model(model_dir)
    tok = load_tokenizer(hf)
    improc = ImageProcessor.from_pretrained(hf, image_min_pixels=image_min_pixels, image_max_pixels=image_max_pixels)
    questions = eval_questions(num, seed=seed)
    rows, correct, chance = [], 0, 0.0
    with tqdm(total=num, desc="evaluate", unit="question", disable=not progress) as bar:
        for i in range(0, num, batch_size):
            chunk = questions[i:i + batch_size]
            gens = generate_batch(model, tok, [(q, [img]) for img, q, _ in chunk], image_processor=improc,
                                  max_new_tokens=8)
            for (img, q, a), g in zip(chunk, gens):
                correct += g.text.strip().lower().rstrip(".") == a
                chance += 1 / (len(COLORS) if q == COLOR_QUESTION else len(SHAPES))
                rows.append((q, a, g.text))
            bar.update(len(chunk))
    return {"accuracy": correct / num, "chance": chance / num, "rows": rows}


def run_demo(s: DemoSettings) -> dict:
    import torch

    from mmtune.convert.dcp_io import resolve_dcp_dir
    from mmtune.convert.dcp_to_hf import dcp_to_hf
    from mmtune.convert.hf_to_dcp import hf_to_dcp
    from mmtune.data.llava import llava_to_mllm
    from mmtune.data.shapes import make_shapes
    from mmtune.models import get_architecture
    from mmtune.plot import plot_metrics
    from mmtune.tiny import make_tiny

    torch.set_num_threads(s.threads)
    t_start = time.perf_counter()
    arch = get_architecture(s.arch)
    w = s.workdir.resolve()
    _prepare_workdir(w, s.overwrite)
    stage = _Stages(8)
    name = TINY_NAMES[s.arch]
    hf_dir, data_dir, dcp_dir, save, export = (w / name, w / "data", w / "ckpt" / "mm_path" / name, w / "save",
                                               w / "export")
    with stage("make-tiny", f"a random {arch.name} architecture model (hub layout) -> {hf_dir}"):
        make_tiny(hf_dir, seed=s.seed, arch=s.arch)
    with stage("make-shapes", f"{s.num_samples} synthetic VQA samples (LLaVA format) -> {data_dir}"):
        llava_json = make_shapes(data_dir, num=s.num_samples, seed=s.seed)
    with stage("llava-to-mllm", "LLaVA json -> the recipe's MLLM json"):
        report = llava_to_mllm(llava_json, data_dir / "mllm_format_shapes.json", image_dir=data_dir)
        print(f"    kept {report.kept} samples, skipped {len(report.skipped)}")
    what = "merge experts" if arch.has_experts else "copy the dense weights"
    with stage("hf-to-dcp", f"{what}, write the DCP that --load reads -> {dcp_dir}"):
        hf_to_dcp(hf_dir, dcp_dir, progress=False)
    data_json, model_json = write_recipe_configs(w, hf_dir, data_dir, "mllm_format_shapes.json", s.arch)
    cmd = train_command(s, data_json, model_json, dcp_dir, save)
    what = f"LoRA r={s.lora_r}, " if s.lora_r else ""
    with stage("train", f"{what}{s.steps} steps, batch {s.batch_size}, lr {s.lr}, {s.nproc} process(es):\n    "
                        + " ".join(cmd[1:])):
        env = {**os.environ, "OMP_NUM_THREADS": str(s.threads), "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_OFFLINE": "1"}
        _run_streamed(cmd, env, w / "train.log")
    latest = resolve_dcp_dir(save)
    step = int(latest.name.split("_")[-1])
    merged = " (the adapters merged into the base)" if s.lora_r else ""
    with stage("dcp-to-hf", f"export {latest.name} to an HF dir{merged} -> {export}"):
        dcp_to_hf(hf_dir, latest, export, progress=False)
    pp = json.loads(data_json.read_text())["dataset_param"]["preprocess_parameters"]
    with stage("evaluate", f"greedy answers of the exported model on {s.num_eval} held-out questions"):
        ev = evaluate(export, s.num_eval, image_max_pixels=pp.get("image_max_pixels"),
                      image_min_pixels=pp.get("image_min_pixels"))
        for q, a, said in ev["rows"][:4]:
            print(f"    Q: {q!r}  expected {a!r}  model: {said!r}")
    with stage("plot", f"loss curve -> {w / 'loss.png'}"):
        plot_metrics(save / "metrics.jsonl", w / "loss.png", title=f"mmtune demo: {name} on shapes", smooth=5)
    total = time.perf_counter() - t_start
    result = {"accuracy": ev["accuracy"], "chance": ev["chance"], "steps": step, "train_s": stage.times["train"],
              "total_s": total, "workdir": str(w), "export": str(export)}
    (w / "summary.json").write_text(json.dumps({**result, "stage_s": stage.times}, indent=2) + "\n")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="mmtune demo",
        description="Run the whole GLM-4.5V recipe on the CPU with no downloads: make a tiny model and a "
                    "synthetic VQA set, convert, train with FSDP2, export to HF, and measure the exported "
                    "model's answers on held-out questions. The last line is 'accuracy=... chance=...'.",
    )
    ap.add_argument("--workdir", default="mmtune_demo", help="where everything is written (default ./mmtune_demo)")
    ap.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --workdir")
    ap.add_argument("--steps", type=int, default=DemoSettings.steps, help="training steps (default %(default)s)")
    ap.add_argument("--nproc", type=int, default=1,
                    help="training processes (FSDP2 ranks over gloo); > 1 launches torchrun (default 1)")
    ap.add_argument("--num-samples", type=int, default=DemoSettings.num_samples,
                    help="training samples to generate (default %(default)s)")
    ap.add_argument("--num-eval", type=int, default=DemoSettings.num_eval,
                    help="held-out questions to evaluate (default %(default)s)")
    ap.add_argument("--batch-size", type=int, default=DemoSettings.batch_size,
                    help="global batch: samples per optimizer step over all processes (default %(default)s)")
    ap.add_argument("--lr", type=float, default=None,
                    help=f"peak learning rate (default {DemoSettings.lr}; with --lora {LORA_LR})")
    ap.add_argument("--lora", action="store_true",
                    help="train LoRA adapters (all-linear, rank --lora-r, alpha 2r) on the frozen base instead of "
                         "all weights; the export merges them")
    ap.add_argument("--lora-r", type=int, default=LORA_R, help="adapter rank with --lora (default %(default)s)")
    ap.add_argument("--warmup-fraction", type=float, default=DemoSettings.warmup_fraction,
                    help="linear warmup over this fraction of the steps, then cosine decay to 0 (default %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the model, the data and training (default 0)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (default 1: fastest for this tiny model)")
    ap.add_argument("--arch", choices=list(TINY_NAMES), default="glm4v_moe",
                    help="the tiny model's architecture: glm4v_moe = GLM-4.5V (MoE, default), glm4v = GLM-4.1V / "
                         "GLM-4.6V-Flash (dense)")
    ap.add_argument("--compile", action="store_true",
                    help="train with --use-torch-compile (the first step compiles: minutes on a small CPU; the "
                         "compiled kernels are cached under /tmp/torchinductor_$USER for the next run)")
    args = ap.parse_args(argv)
    for name in ("steps", "nproc", "num_samples", "num_eval", "batch_size", "threads", "lora_r"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    s = DemoSettings(Path(args.workdir), steps=args.steps, nproc=args.nproc, num_samples=args.num_samples,
                     num_eval=args.num_eval, batch_size=args.batch_size, seed=args.seed,
                     lr=args.lr if args.lr is not None else (LORA_LR if args.lora else DemoSettings.lr),
                     warmup_fraction=args.warmup_fraction, lora_r=args.lora_r if args.lora else None,
                     threads=args.threads, overwrite=args.overwrite, arch=args.arch,
                     compile=args.compile)
    r = run_demo(s)
    print(f"\nsummary: the exported model ({r['export']}) answers {r['accuracy']:.1%} of {s.num_eval} held-out "
          f"questions correctly (chance {r['chance']:.1%}) after {r['steps']} steps; training took "
          f"{r['train_s']:.0f}s, the whole demo {r['total_s']:.0f}s. Loss curve: {Path(r['workdir']) / 'loss.png'}")
    print(f"accuracy={r['accuracy']:.4f} chance={r['chance']:.4f} steps={r['steps']} train_s={r['train_s']:.1f} "
          f"total_s={r['total_s']:.1f}")
    return 0
