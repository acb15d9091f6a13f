"""`mmtune plan`'s activation model against measured CPU memory (docs/PERFORMANCE.md "Memory plan vs measured").

Part 1, whole steps: the tiny GLM-4.5V (glm4v_moe) and GLM-4.1V (glm4v) models, batch 2 x 1024 tokens, fp32,
everything trainable, plain cross-entropy; recompute none and full. Measured (mmtune.plan.measure_training_step):
the first step (AdamW creates its state inside its step()) and a later one (one warm-up step first: the state
exists throughout, as the estimate assumes). The estimate is `mmtune plan` for one GPU with the same settings;
its peak phase says where in the step it puts the peak.

Part 2, one layer at GLM-4.5V's proportions (1/8 of its width: hidden 512, 12 heads of 128 (q = 3h), 1 KV head
(kv = h/4), 16 experts top-8 of intermediate 176, a shared expert, dense intermediate 1368), a dense and a MoE
layer, batch 2 x 1024, in bf16 and fp32: the bytes per token each layer saves for backward (no recompute) and
the MoE layer's largest moment under full recompute (its recomputed forward and its backward, beyond its
input), measured as live tensor storages, against activations.decoder_layer_bytes_per_token and
layer_working_bytes_per_token. Parameter storages are left out of the count.

    flock /tmp/mmtune-bench.lock python bench/plan_memory.py
"""

from __future__ import annotations

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from mmtune.plan import activations as A  # noqa: E402
from mmtune.plan import estimate, measure_training_step  # noqa: E402
from mmtune.plan.measure import LiveTensorBytes  # noqa: E402

B, S = 2, 1024


def whole_steps() -> None:
    from mmtune.models.glm4v import tiny_config as dense_tiny
    from mmtune.models.glm4v_moe import tiny_config as moe_tiny

    print("tiny model, fp32, batch 2 x 1024: MB (estimate / measured)")
    print(f"{'model':<10} {'recompute':<9} {'estimate':>9} {'1st step':>9} {'ratio':>6} {'later':>9} {'ratio':>6}  "
          "estimate's peak")
    for name, config in (("glm4v_moe", moe_tiny()), ("glm4v", dense_tiny())):
        for recompute in ("none", "full"):
            est = estimate(config, gpus=1, seq_length=S, micro_batch_size=B, recompute=recompute,
                           compute_dtype="fp32", frozen=(), image_patches=16 * B, loss_chunk_size=0)
            first, later = (measure_training_step(config, micro_batch_size=B, seq_length=S, recompute=recompute,
                                                  warmup_steps=w)["peak"] for w in (0, 1))
            e = est.total_bytes
            print(f"{name:<10} {recompute:<9} {e / 1e6:9.2f} {first / 1e6:9.2f} {e / first:6.3f} {later / 1e6:9.2f} "
                  f"{e / later:6.3f}  {est.peak_phase}")


class _Timeline(LiveTensorBytes):
    """LiveTensorBytes that leaves the given storages (the parameters) out and logs the bytes after each op,
    with the layer whose input norm ran last."""

    def __init__(self, exclude: set[int], where: list):
        super().__init__()
        self.exclude, self.where, self.log = exclude, where, []

    def _record(self, out) -> None:
        from torch.utils._pytree import tree_flatten

        kept = [t for t in tree_flatten(out)[0]
                if not (isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.exclude)]
        super()._record(kept)
        self.log.append((self.where[0], self.current))


def glm45v_shaped_layers(dtype: torch.dtype) -> None:
    from mmtune.models.glm4v_moe import tiny_config
    from mmtune.models.glm4v_moe.text import TextModel
    from mmtune.ops.attention import AttentionMask

    t = dataclasses.replace(tiny_config().text, hidden_size=512, num_attention_heads=12, num_key_value_heads=1,
                            head_dim=128, moe_intermediate_size=176, intermediate_size=1368, n_routed_experts=16,
                            num_experts_per_tok=8, n_shared_experts=1, num_hidden_layers=2, first_k_dense_replace=1,
                            mrope_section=[8, 12, 12])
    c, T = torch.tensor([], dtype=dtype).element_size(), B * S

    def run(recompute: bool) -> tuple[_Timeline, int]:
        torch.manual_seed(0)
        model = TextModel(t)
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02)
        model.to(dtype)
        for layer in model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.float()  # routers stay fp32
        if recompute:
            from torch.distributed._composable import checkpoint

            for layer in model.layers:
                checkpoint(layer)
        where = ["-"]
        for i, layer in enumerate(model.layers):  # a layer's ops: from its input norm to its end (or, recomputed
            # in backward, to the next layer's recompute: the checkpointed layer's own hooks do not run there)
            layer.input_layernorm.register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, i))
            layer.register_forward_hook(lambda m, a, o: where.__setitem__(0, "-"))
        tracker = _Timeline({p.untyped_storage().data_ptr() for p in model.parameters()}, where)
        x = torch.randn(B, S, t.hidden_size, dtype=dtype, requires_grad=True)
        with tracker.mode:
            h, _ = model(x, torch.arange(S).expand(3, B, S), AttentionMask(causal=True))
            forward_end = len(tracker.log)
            where[0] = "-"
            h.float().square().mean().backward()
        return tracker, forward_end

    name = str(dtype).removeprefix("torch.")
    tracker, end = run(False)
    log = tracker.log[:end]
    for i in range(t.num_hidden_layers):
        steps = [j for j, (w, _) in enumerate(log) if w == i]
        measured = (log[steps[-1]][1] - log[steps[0] - 1][1]) / T  # its output counts as the next one's input
        model_b = A.decoder_layer_bytes_per_token(t, i, c)
        kind = "MoE" if t.is_moe_layer(i) else "dense"
        print(f"{name:<8} {kind:<5} saved for backward          {measured:7.0f} B/token, model {model_b:7.0f} "
              f"({model_b / measured:.3f})")
    tracker, end = run(True)
    log = tracker.log[end:]
    last = t.num_hidden_layers - 1
    window = [j for j, (w, _) in enumerate(log) if w == last]
    start = log[window[0] - 1][1]  # the gradient from above is alive here: add it back below
    measured = (max(cur for _, cur in log[window[0]:window[-1] + 1]) - start) / T + c * t.hidden_size
    model_b = A.layer_working_bytes_per_token(t, last, c)
    print(f"{name:<8} MoE   recomputed, at its largest {measured:7.0f} B/token, model {model_b:7.0f} "
          f"({model_b / measured:.3f})")


if __name__ == "__main__":
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    whole_steps()
    print("\nGLM-4.5V-shaped layers (1/8 width), batch 2 x 1024: bytes per token")
    for dtype in (torch.bfloat16, torch.float32):
        glm45v_shaped_layers(dtype)
