"""LoRA on the CPU, side by side in one run (docs/PERFORMANCE.md "LoRA").

Part 1, the model step: mmtune's GLM-4.5V model on the CPU bench config (bench/model_step_cpu.py: text 256
wide, 4 layers, 16 experts top-4, vision 2 blocks), batch 4 x 512 tokens, forward + cross-entropy + backward
+ AdamW step, fp32: full finetuning against LoRA (all-linear: every Linear and the routed experts, r 16).
Reports step time (median and best of interleaved steps), trainable parameters and the peak of live tensor
bytes (parameters + everything the step allocates, as `mmtune plan --measure` counts it).

Part 2, LoRA on the routed experts alone: one MoE layer's experts (T tokens, top-K of E), forward + backward
with a frozen base (the input needs its gradient, as inside a model). mmtune's per-expert adapters in the
grouped matmuls against PEFT's `target_parameters` on transformers' own experts module (grouped_mm
implementation), each beside its own no-LoRA baseline. The overhead is LoRA time - baseline time.

    flock /tmp/mmtune-bench.lock python bench/lora_step.py [--steps 6] [--rank 16] [--threads 1 --cpu-time]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from model_step_cpu import bench_config, make_batch  # noqa: E402

from mmtune.models.glm4v_moe import Glm4vMoeForConditionalGeneration  # noqa: E402
from mmtune.train.freeze import FreezeSpec  # noqa: E402
from mmtune.train.lora import LoRAConfig, apply_lora, init_adapters  # noqa: E402

TRAIN_ALL = FreezeSpec(vision_encoder=False, vision_projector=False, text_decoder=False)


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def _interleaved(fns: dict, steps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Each round runs every variant once; the order rotates from round to round, so that no variant always
    follows the same one (a run inherits its predecessor's caches and freed memory)."""
    times = {k: [] for k in fns}
    names = list(fns)
    for i in range(warmup + steps):
        for k in names[i % len(names):] + names[: i % len(names)]:
            fn = fns[k]
            t0 = CLOCK()
            fn()
            if i >= warmup:
                times[k].append(CLOCK() - t0)
    return times


# --------------------------------------------------------------------------------------- part 1


def _model(lora: LoRAConfig | None):
    torch.manual_seed(0)
    model = Glm4vMoeForConditionalGeneration(bench_config())
    model.init_weights(0)
    if lora is not None:
        apply_lora(model, lora, TRAIN_ALL)
        init_adapters(model, 0)
        with torch.no_grad():  # trained-looking adapters (B != 0): the same work either way
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_(0, 0.01)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=True)
    return model, opt


def _step_fn(model, opt, batch):
    ids, pixels, grids, labels = batch
    V = model.config.text.vocab_size

    def step():
        out = model(ids, pixel_values=pixels, image_grid_thw=grids)
        F.cross_entropy(out.logits.float().view(-1, V), labels.view(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _peak(model, opt, batch) -> int:
    from mmtune.plan import LiveTensorBytes

    tracker = LiveTensorBytes()
    step = _step_fn(model, opt, batch)
    with tracker.mode:
        step()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    state = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
    return params + state + tracker.peak


def part1(steps: int, rank: int) -> None:
    batch = make_batch(bench_config(), 4, 512)
    runs = {"full": _model(None), "lora": _model(LoRAConfig(r=rank, alpha=2.0 * rank))}
    fns = {k: _step_fn(m, o, batch) for k, (m, o) in runs.items()}
    times = _interleaved(fns, steps)
    print(f"part 1: model step, bench config, batch 4 x 512, fp32, {torch.get_num_threads()} threads, "
          f"{steps} steps each interleaved")
    base = statistics.median(times["full"])
    for k, (m, o) in runs.items():
        trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
        total = sum(p.numel() for p in m.parameters())
        fresh_m, fresh_o = _model(None if k == "full" else LoRAConfig(r=rank, alpha=2.0 * rank))
        peak = _peak(fresh_m, fresh_o, batch)
        med, best = statistics.median(times[k]), min(times[k])
        print(f"  {k:<5} step median {med:.3f} s best {best:.3f} s ({base / med:.2f}x full's speed) | trainable "
              f"{trainable:,} of {total:,} ({100 * trainable / total:.1f}%) | peak live tensors "
              f"{peak / 2**20:.0f} MiB")


# --------------------------------------------------------------------------------------- part 2


def part2(steps: int, rank: int, E: int, H: int, I: int, T: int, K: int) -> None:  # noqa: E741
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import Glm4vMoeTextConfig
    from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextExperts

    from mmtune.ops.lora import wrap_experts
    from mmtune.ops.moe import GroupedExperts

    g = torch.Generator().manual_seed(0)
    ours = GroupedExperts(E, H, I)
    with torch.no_grad():
        ours.gate_up_proj.copy_(torch.randn(ours.gate_up_proj.shape, generator=g) * 0.02)
        ours.down_proj.copy_(torch.randn(ours.down_proj.shape, generator=g) * 0.02)
    ours.requires_grad_(False)
    ours_lora = wrap_experts(ours, rank, 2.0 * rank)
    with torch.no_grad():
        ours_lora.gate_up_proj_lora_A.normal_(0, 0.02)
        ours_lora.down_proj_lora_A.normal_(0, 0.02)
        ours_lora.gate_up_proj_lora_B.normal_(0, 0.02)
        ours_lora.down_proj_lora_B.normal_(0, 0.02)

    cfg = Glm4vMoeTextConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K)
    cfg._experts_implementation = "grouped_mm"

    def hf_experts():
        m = Glm4vMoeTextExperts(cfg)
        with torch.no_grad():
            m.gate_up_proj.copy_(ours.gate_up_proj)
            m.down_proj.copy_(ours.down_proj)
        m.requires_grad_(False)
        return m

    class Holder(torch.nn.Module):
        def __init__(self, experts):
            super().__init__()
            self.experts = experts

    hf_base = hf_experts()
    holder = Holder(hf_experts())
    peft_cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_parameters=["experts.gate_up_proj", "experts.down_proj"],
                          init_lora_weights=False)
    holder = inject_adapter_in_model(peft_cfg, holder)
    peft_experts = holder.experts
    n_peft = sum(p.numel() for n, p in holder.named_parameters() if "lora_" in n)
    n_ours = sum(p.numel() for n, p in ours_lora.named_parameters() if "lora_" in n)
    assert n_peft == n_ours, (n_peft, n_ours)

    x = torch.randn(T, H, generator=g)
    logits = torch.randn(T, E, generator=g)
    w, idx = logits.softmax(-1).topk(K, dim=-1)

    def run(module, hf: bool):
        def fn():
            xi = x.clone().requires_grad_(True)
            out = module(xi, idx, w) if hf else module(xi, w, idx)
            out.pow(2).mean().backward()
        return fn

    # same function: check before timing (the PEFT adapters copied from ours, in PEFT's layout)
    with torch.no_grad():
        inner = peft_experts.base_layer  # gate_up (inner), down (outer): PEFT nests the two wrappers
        for wrapper, p in ((inner, "gate_up_proj"), (peft_experts, "down_proj")):
            A, B = getattr(ours_lora, f"{p}_lora_A"), getattr(ours_lora, f"{p}_lora_B")
            wrapper.lora_A["default"].weight.copy_(A.reshape(E * rank, -1))
            wrapper.lora_B["default"].weight.copy_(B.permute(1, 2, 0).reshape(B.shape[1], rank * E))
    with torch.no_grad():
        diff = (ours_lora(x, w, idx) - peft_experts(x, idx, w)).abs().max().item()
    fns = {"ours base": run(ours, False), "ours LoRA": run(ours_lora, False),
           "hf base": run(hf_base, True), "hf+PEFT LoRA": run(peft_experts, True)}
    times = _interleaved(fns, steps)
    med = {k: statistics.median(v) for k, v in times.items()}
    best = {k: min(v) for k, v in times.items()}
    print(f"part 2: routed experts only, E={E} H={H} I={I} tokens={T} top-{K}, r={rank}, fwd+bwd (frozen base), "
          f"{steps} steps interleaved; max |ours - PEFT| output {diff:.1e}")
    for k in fns:
        print(f"  {k:<14} median {1e3 * med[k]:8.2f} ms  best {1e3 * best[k]:8.2f} ms")
    ours_over = med["ours LoRA"] - med["ours base"]
    peft_over = med["hf+PEFT LoRA"] - med["hf base"]
    print(f"  LoRA overhead (median): ours {1e3 * ours_over:.2f} ms, PEFT target_parameters {1e3 * peft_over:.2f} ms "
          f"-> {peft_over / max(ours_over, 1e-9):.1f}x less; with LoRA: ours {1e3 * med['ours LoRA']:.2f} ms vs PEFT "
          f"{1e3 * med['hf+PEFT LoRA']:.2f} ms -> {med['hf+PEFT LoRA'] / med['ours LoRA']:.2f}x faster")
    # the same overhead as the median of each round's difference (a round runs the four back to back): a
    # slow stretch of the machine then shifts both terms of a difference alike instead of only one median
    ours_pair = statistics.median(a - b for a, b in zip(times["ours LoRA"], times["ours base"]))
    peft_pair = statistics.median(a - b for a, b in zip(times["hf+PEFT LoRA"], times["hf base"]))
    print(f"  LoRA overhead (median of per-round differences): ours {1e3 * ours_pair:.2f} ms, PEFT "
          f"{1e3 * peft_pair:.2f} ms -> {peft_pair / max(ours_pair, 1e-9):.1f}x less")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench/lora_step.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant (after 1 warm-up step)")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--part", choices=["1", "2", "both"], default="both")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")),
                   help="torch threads (default $OMP_NUM_THREADS or 2)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time each step by the process's CPU time (with --threads 1: what a step costs when other "
                        "jobs share the cores, which the wall clock does not show)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        global CLOCK
        CLOCK = time.process_time
    if args.part in ("1", "both"):
        part1(args.steps, args.rank)
    if args.part in ("2", "both"):
        c = bench_config().text
        part2(args.steps, args.rank, c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, 4 * 512,
              c.num_experts_per_tok)
        # GLM-4.5V's expert count and aspect (128 experts top-8), widths scaled down 8x for the CPU
        part2(args.steps, args.rank, 128, 512, 176, 4096, 8)
    return 0


if __name__ == "__main__":
    sys.exit(main())
