"""CPU train step (forward + cross-entropy + backward) of mmtune's GLM-4.5V model against transformers'
Glm4vMoeForConditionalGeneration on the same config, weights and batch (or, with --arch glm4v, of the
dense GLM-4.1V model against transformers' Glm4vForConditionalGeneration); prints tokens/s and the ratio.

transformers runs with its best implementation on this machine: for GLM-4.5V both experts
implementations `grouped_mm` and `eager` are timed, for GLM-4.1V both attention implementations `sdpa`
and `eager`; the faster one is the baseline. Runs are interleaved (ours, hf-a, hf-b, ours, ...) so that
machine noise hits all alike; the median step time of each is reported, and the best step (closest to
the uncontended cost on a shared machine).

    python bench/model_step_cpu.py [--arch glm4v_moe|glm4v] [--steps 6] [--batch 4] [--seq 512] [--packed N] [--profile]
                                   [--threads 1 --cpu-time]   # on a shared machine
                                   [--compile]                # + ours with --use-torch-compile's compiled blocks

With --compile a copy of ours has every block compiled as `mmtune train --use-torch-compile` does (dynamic
shapes; --static for fixed ones); its first step (compiling) is timed apart, and its loss must equal eager's
before anything is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from mmtune.models import get_architecture  # noqa: E402
from mmtune.models.glm4v_moe import tiny_config  # noqa: E402
from mmtune.models.glm4v_moe.rope import get_rope_index, mm_token_types  # noqa: E402


# operators whose time is the matmul, attention and convolution kernels themselves (the same in both models)
SHARED_KERNELS = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::addmm_",
    "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
    "aten::mkldnn_convolution", "aten::convolution_backward",
}
WAITS = ("threading.py", "<built-in method acquire")  # the profiler's own waits on the autograd thread


def dense_bench_config():
    """The dense counterpart of bench_config(): text 256 wide, 4 layers, MLP 1024, GQA 4/2; vision 2 blocks."""
    from mmtune.models.glm4v import tiny_config as dense_tiny

    c = dense_tiny()
    text = dataclasses.replace(c.text, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, mrope_section=[4, 6, 6])
    vision = dataclasses.replace(c.vision, depth=2, hidden_size=128, num_heads=2, intermediate_size=256, out_hidden_size=256)
    return dataclasses.replace(c, text=text, vision=vision)


def bench_config():
    """docs/PERFORMANCE.md "Model train step on the CPU": text 256 wide, 4 layers, 16 experts top-4; vision 2 blocks."""
    c = tiny_config()
    text = dataclasses.replace(
        c.text, hidden_size=256, intermediate_size=512, moe_intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, mrope_section=[4, 6, 6],
        n_routed_experts=16, num_experts_per_tok=4, first_k_dense_replace=1,
    )
    vision = dataclasses.replace(c.vision, depth=2, hidden_size=128, num_heads=2, intermediate_size=256, out_hidden_size=256)
    return dataclasses.replace(c, text=text, vision=vision)


def make_batch(cfg, batch: int, seq: int, grid=(1, 8, 8), seed: int = 0):
    """Each row: one image (grid -> t*h*w/4 placeholders) inside text, `seq` tokens in all."""
    g = torch.Generator().manual_seed(seed)
    n_img = grid[0] * grid[1] * grid[2] // cfg.vision.spatial_merge_size**2
    rows = []
    for _ in range(batch):
        text = torch.randint(0, 400, (seq - n_img - 2,), generator=g).tolist()
        rows.append(text[:8] + [cfg.image_start_token_id] + [cfg.image_token_id] * n_img + [cfg.image_end_token_id] + text[8:])
    ids = torch.tensor(rows)
    patches = grid[0] * grid[1] * grid[2]
    pixels = torch.randn(batch * patches, cfg.vision.patch_dim, generator=g)
    grids = torch.tensor([grid] * batch)
    labels = torch.randint(0, 400, ids.shape, generator=g)
    return ids, pixels, grids, labels


def packed_inputs(cfg, ids, grids, samples_per_row: int):
    """Split each row into `samples_per_row` segments (image in the first) with per-segment positions."""
    B, S = ids.shape
    kw = dict(image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
              video_end_token_id=cfg.video_end_token_id)
    seg = S // samples_per_row
    bounds, pos_rows = [0], []
    for b in range(B):
        pieces = []
        for s in range(samples_per_row):
            lo, hi = s * seg, (S if s == samples_per_row - 1 else (s + 1) * seg)
            pieces.append(get_rope_index(ids[b, lo:hi], grids[b : b + 1] if s == 0 else None, **kw)[0])
            bounds.append(b * S + hi)
        pos_rows.append(torch.cat(pieces, dim=1))
    return torch.stack(pos_rows, dim=1), torch.tensor(bounds, dtype=torch.int32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/model_step_cpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per model (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=4, help="rows per batch")
    p.add_argument("--seq", type=int, default=512, help="tokens per row")
    p.add_argument("--packed", type=int, default=0, metavar="N",
                   help="also time ours on packed rows: N samples per row (cu_seqlens); transformers has no CPU equivalent")
    p.add_argument("--profile", action="store_true", help="print a torch.profiler table of one step of each")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time each step by the process's CPU time instead of the wall clock (with --threads 1: "
                        "what a step costs when other jobs share the cores, which the wall clock does not show)")
    p.add_argument("--arch", choices=["glm4v_moe", "glm4v"], default="glm4v_moe",
                   help="glm4v_moe: GLM-4.5V (MoE, default); glm4v: the dense GLM-4.1V")
    p.add_argument("--compile", action="store_true",
                   help="also time ours with --use-torch-compile's per-block torch.compile (same weights; compile "
                        "time reported separately)")
    p.add_argument("--static", action="store_true", help="with --compile: static shapes (default: dynamic, as training)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    arch = get_architecture(args.arch)
    cfg = bench_config() if args.arch == "glm4v_moe" else dense_bench_config()
    HF = getattr(transformers, arch.hf_class_name)
    HFConfig = getattr(transformers, arch.hf_class_name.replace("ForConditionalGeneration", "Config"))
    torch.manual_seed(0)
    ours = arch.model_class(cfg)
    ours.init_weights(0)
    hf = {}
    if arch.has_experts:
        variants = {impl: dict(attn_implementation="sdpa", experts_implementation=impl) for impl in ("grouped_mm", "eager")}
    else:
        variants = {impl: dict(attn_implementation=impl) for impl in ("sdpa", "eager")}
    for name, kw in variants.items():
        m = HF._from_config(HFConfig(**cfg.to_dict()), **kw)
        m.load_state_dict(ours.state_dict())
        hf[name] = m.train()
    ours.train()
    n_params = sum(x.numel() for x in ours.parameters())

    ids, pixels, grids, labels = make_batch(cfg, args.batch, args.seq)
    types = torch.stack([mm_token_types(r, image_token_id=cfg.image_token_id, video_start_token_id=cfg.video_start_token_id,
                                        video_end_token_id=cfg.video_end_token_id) for r in ids])
    tokens = ids.numel()

    def loss_of(logits):
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.view(-1))

    def step_ours():
        loss_of(ours(ids, pixel_values=pixels, image_grid_thw=grids).logits).backward()

    def make_step_hf(m):
        def step():
            out = m(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=types)
            loss_of(out.logits).backward()
        return step

    runs = {"ours": step_ours, **{f"hf-{k}": make_step_hf(m) for k, m in hf.items()}}
    if args.packed:
        pos, cu = packed_inputs(cfg, ids, grids, args.packed)

        def step_packed():
            out = ours(ids, pixel_values=pixels, image_grid_thw=grids, position_ids=pos, cu_seqlens=cu)
            loss_of(out.logits).backward()

        runs[f"ours-packed{args.packed}"] = step_packed
        # transformers' packed form: a 4th (first) position row with each sample's text positions, no
        # attention mask; its mask code then keeps attention inside each sample (docs/GLM45V.md section 3)
        starts = torch.zeros(ids.numel(), dtype=torch.long)
        starts[cu[:-1].long()] = 1
        seg_id = starts.cumsum(0) - 1
        text_pos = (torch.arange(ids.numel()) - cu[:-1].long()[seg_id]).view(ids.shape)
        pos4 = torch.cat([text_pos[None], pos])

        def make_step_hf_packed(m):
            def step():
                out = m(input_ids=ids, pixel_values=pixels, image_grid_thw=grids, mm_token_type_ids=types,
                        position_ids=pos4, use_cache=False)
                loss_of(out.logits).backward()
            return step

        runs.update({f"hf-{k}-packed{args.packed}": make_step_hf_packed(m) for k, m in hf.items()})

    compiled = {}
    if args.compile:
        import copy

        from mmtune.distributed.compile import apply_compile, compile_counters

        ours_c = copy.deepcopy(ours)
        apply_compile(ours_c, dynamic=not args.static)
        compiled["model"] = ours_c

        def compiled_step(**packed):
            def step():
                loss = loss_of(ours_c(ids, pixel_values=pixels, image_grid_thw=grids, **packed).logits)
                loss.backward()
                return loss.detach()
            return step

        variants = {"ours-compiled": {}}
        if args.packed:
            variants[f"ours-compiled-packed{args.packed}"] = dict(position_ids=pos, cu_seqlens=cu)
        compiled["compile_s"] = {}
        for name, packed in variants.items():
            t0 = time.perf_counter()
            loss_c = compiled_step(**packed)()  # compiles forward and backward of each block kind
            compiled["compile_s"][name] = time.perf_counter() - t0
            eager_out = ours(ids, pixel_values=pixels, image_grid_thw=grids, **packed)
            loss_e = loss_of(eager_out.logits).detach()
            if not torch.allclose(loss_c, loss_e, rtol=1e-5, atol=1e-5):  # the same numbers before any timing
                raise AssertionError(f"{name}: compiled loss {float(loss_c)} != eager {float(loss_e)}")
            ours_c.zero_grad(set_to_none=True)
            runs[name] = compiled_step(**packed)

    clock = time.process_time if args.cpu_time else time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(args.steps + 2):
        for name, fn in runs.items():
            for m in [ours, *hf.values(), *([compiled["model"]] if compiled else [])]:
                m.zero_grad(set_to_none=True)
            t0 = clock()
            fn()
            dt = clock() - t0
            if i >= 2:
                times[name].append(dt)

    print(f"timing: {'process CPU time' if args.cpu_time else 'wall clock'}")
    print(f"config: {arch.model_type}, {n_params / 1e6:.1f}M params, batch {args.batch}x{args.seq} tokens, one {tuple(grids[0].tolist())} "
          f"image per row, torch {torch.__version__}, {torch.get_num_threads()} threads")
    med = {k: statistics.median(v) for k, v in times.items()}
    low = {k: min(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:>{max(map(len, med))}}: median {t:.3f} s/step  {tokens / t:8.0f} tokens/s   (best step {low[name]:.3f} s)")
    hf_runs = [f"hf-{k}" for k in hf]
    best = min(hf_runs, key=lambda k: med[k])
    print(f"ratio ours / transformers ({best}): {med[best] / med['ours']:.2f}x tokens/s (median steps), "
          f"{min(low[k] for k in hf_runs) / low['ours']:.2f}x (best steps)")
    if args.packed:
        n = args.packed
        hf_packed = [f"{k}-packed{n}" for k in hf_runs]
        best_p = min(hf_packed, key=lambda k: med[k])
        print(f"packed rows ({n} samples per row) ours / transformers ({best_p}): "
              f"{med[best_p] / med[f'ours-packed{n}']:.2f}x (median steps), "
              f"{min(low[k] for k in hf_packed) / low[f'ours-packed{n}']:.2f}x (best steps)")

    if args.compile:
        print(f"ratio ours-compiled / transformers ({best}): {med[best] / med['ours-compiled']:.2f}x tokens/s (median "
              f"steps), {min(low[k] for k in hf_runs) / low['ours-compiled']:.2f}x (best steps); "
              f"compiled / eager ours {med['ours'] / med['ours-compiled']:.2f}x (median steps)")
        if args.packed:
            n = f"packed{args.packed}"
            print(f"packed rows: ours-compiled / ours eager {med[f'ours-{n}'] / med[f'ours-compiled-{n}']:.2f}x "
                  f"(median steps)")
        print(f"first compiled steps (compiling, wall clock): "
              f"{ {k: round(v, 1) for k, v in compiled['compile_s'].items()} } s; {compile_counters()}; "
              f"compiled losses equal eager's (rtol 1e-5)")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        shared = {}
        for name in ("ours", best, *(["ours-compiled"] if args.compile else [])):
            for m in [ours, *hf.values(), *([compiled["model"]] if compiled else [])]:
                m.zero_grad(set_to_none=True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                runs[name]()
            events = prof.key_averages()
            print(f"--- profile: {name}")
            print(events.table(sort_by="self_cpu_time_total", row_limit=18))
            total = sum(e.self_cpu_time_total for e in events if not e.key.startswith(WAITS))
            shared[name] = (sum(e.self_cpu_time_total for e in events if e.key in SHARED_KERNELS), total)
        # the matmul / attention / convolution kernels both models call on the same shapes: a step cannot
        # be faster than its time in them, so hf's step / ours's kernel time bounds the ratio any change
        # outside those kernels can reach (docs/PERFORMANCE.md "Speed")
        hf_total = shared[best][1]
        for name, (kern, total) in shared.items():
            print(f"profile {name}: {total / 1e6:.3f} s of operators, {kern / 1e6:.3f} s ({100 * kern / total:.0f}%) in "
                  f"matmul/attention/convolution kernels"
                  + ("" if name == best else f"; ceiling with nothing else left: {hf_total / kern:.2f}x {best}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
