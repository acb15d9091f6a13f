"""Measuring a training step's memory on the CPU, to check `mmtune plan`'s estimate against (tests/test_plan.py,
bench/context_parallel.py, bench/lora_step.py)."""

from __future__ import annotations

import torch

from mmtune.models import architecture_for_config
from mmtune.train.freeze import module_of


class LiveTensorBytes:
    """Peak bytes of tensor storages alive at once, for everything run under it (a TorchDispatchMode that
    records each new output storage and, through a weakref finaliser, when it is freed). On the CPU this
    plays the role of torch.cuda.max_memory_allocated: it sees every tensor autograd saves, every
    gradient and optimizer state, and no allocator caching or Python overhead. A storage made before it,
    such as a parameter's, is counted from the first op under it that returns a view of it (F.linear's
    transpose of its weight) until it is freed: measure_training_step's peaks hold most Linear weights twice."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        tracker = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                tracker._record(out)
                return out

        self.mode = _Mode()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _record(self, out) -> None:
        import weakref

        from torch.utils._python_dispatch import is_traceable_wrapper_subclass
        from torch.utils._pytree import tree_flatten

        for t in tree_flatten(out)[0]:
            # a DTensor has no storage of its own: its local tensor is recorded by the op that made it
            if not isinstance(t, torch.Tensor) or t.device.type == "meta" or is_traceable_wrapper_subclass(t):
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.live:
                continue
            self.live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def measure_training_step(config, *, micro_batch_size: int, seq_length: int,
                          recompute: str = "none", frozen: tuple[str, ...] = (), images_per_sample: int = 1,
                          seed: int = 0, warmup_steps: int = 0) -> dict[str, int]:
    """Measured peak bytes of one fp32 training step on the CPU (SDPA attention): forward, cross-entropy over
    all logits, backward, AdamW step. Returns {"params", "optimizer_state", "peak_step", "peak"} where peak =
    parameter bytes + AdamW state bytes from before the step + the peak of everything the step allocates (see
    `LiveTensorBytes`). One process, no sharding (the FSDP2 layout over one rank holds the same tensors,
    less the all-gather buffers).

    `warmup_steps`: steps run first, untracked, each ending as the trainer's (gradients set to None). With 0
    the measured step is the first: AdamW creates its state in its step(), so its forward and backward
    hold none; with 1 or more the state exists throughout, as in every later step (what `estimate` plans)."""
    from mmtune.distributed.parallelize import apply_activation_checkpointing
    from mmtune.train.model_options import apply_model_options

    torch.manual_seed(seed)
    model = architecture_for_config(config).model_class(config)
    model.init_weights(seed=seed)
    # SDPA's flash kernel, which keeps a log-sum-exp per query as the GPU's flash kernels do (what the
    # activation model plans); the CPU's default causal kernel keeps its probabilities (ops/chunked_attention.py)
    apply_model_options(model, vision_attn="sdpa", text_attn="sdpa", grouped_mm=True)
    for name, p in model.named_parameters():
        p.requires_grad_(module_of(name) not in frozen)
    if recompute == "full":
        apply_activation_checkpointing(model, vision=True)
    v, t = config.vision, config.text
    m = v.spatial_merge_size
    grid = torch.tensor([[1, 2 * m, 2 * m]] * (micro_batch_size * images_per_sample))
    n_img_tokens = 4 * images_per_sample  # (2m * 2m) patches -> 4 tokens each
    gen = torch.Generator().manual_seed(seed)
    ids_BS = torch.randint(0, 400, (micro_batch_size, seq_length), generator=gen)
    ids_BS[:, 1:1 + n_img_tokens] = config.image_token_id
    pixels = torch.randn(int(grid.prod(-1).sum()), v.patch_dim, generator=gen)
    labels_BS = torch.randint(0, 400, (micro_batch_size, seq_length), generator=gen)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=False)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    def step(set_to_none: bool) -> None:
        out = model(ids_BS, pixel_values=pixels, image_grid_thw=grid)
        loss = torch.nn.functional.cross_entropy(out.logits.float().view(-1, t.vocab_size), labels_BS.view(-1))
        del out
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)

    for _ in range(warmup_steps):
        step(set_to_none=True)
    state = sum(s.numel() * s.element_size() for st in opt.state.values() for s in st.values() if torch.is_tensor(s))
    tracker = LiveTensorBytes()
    with tracker.mode:
        step(set_to_none=False)
    return {"params": params, "optimizer_state": state, "peak_step": tracker.peak,
            "peak": params + state + tracker.peak}
