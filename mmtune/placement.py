"""Where `mmtune generate --device cuda` puts a model: one GPU when it fits, else its layers in order over
all visible GPUs (one process; each GPU runs its layers in turn, as pipeline stages without overlap), else
an error before anything is loaded that says how much memory it needs and what to use instead.

Units, in execution order: the front (vision tower + token embedding, which must share a device: the image
features replace placeholder embeddings), each decoder layer, and the back (final norm + lm head). A unit
is never split. Each unit's forward pre-hook moves its inputs to its device (hidden states, rotary
tables, the attention mask); the KV cache of a layer lives on that layer's device.

Budget per GPU: HEADROOM of its free memory minus RESERVE_GIB for activations, the KV cache and the
allocator (generation batches are small; `mmtune generate` answers one prompt).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

GiB = 1024**3
HEADROOM = 0.9
RESERVE_GIB = 2.0


def units_of(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) per placement unit, in execution order; every parameter and buffer is in one."""
    text = model.model.language_model
    units = [("vision tower + embedding", [model.model.visual, text.embed_tokens])]
    units += [(f"decoder layer {i}", [layer]) for i, layer in enumerate(text.layers)]
    units.append(("final norm + lm head", [text.norm, model.lm_head]))
    covered = {id(t) for _, mods in units for m in mods for t in [*m.parameters(), *m.buffers()]}
    stray = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if id(t) not in covered]
    assert not stray, f"tensors outside every placement unit: {stray[:4]}"
    return units


def unit_bytes(model: nn.Module) -> list[int]:
    """Bytes of each unit's parameters and buffers as the model holds them (a meta model is fine)."""
    return [sum(t.numel() * t.element_size() for m in mods for t in [*m.parameters(), *m.buffers()])
            for _, mods in units_of(model)]


def plan_devices(sizes: list[int], free: list[int], *, what: str = "the model") -> list[int]:
    """The GPU index of each unit: all on GPU 0 when they fit there, else filled in order over the GPUs.
    ValueError naming the memory needed and the alternatives when they do not fit (or no GPU is visible)."""
    total = sum(sizes)
    budget = [max(0, int(f * HEADROOM - RESERVE_GIB * GiB)) for f in free]
    if budget and total <= budget[0]:
        return [0] * len(sizes)
    out, gpu, used = [], 0, 0
    for size in sizes:
        while gpu < len(budget) and used + size > budget[gpu]:
            gpu, used = gpu + 1, 0
        if gpu == len(budget):
            break
        out.append(gpu)
        used += size
    if len(out) == len(sizes):
        return out
    have = ", ".join(f"{f / GiB:.1f}" for f in free) or "none"
    raise ValueError(
        f"--device cuda: {what} needs {total / GiB:.1f} GiB for its weights, plus about {RESERVE_GIB:.0f} GiB per GPU "
        f"for activations and the KV cache (GPUs are filled to {HEADROOM:.0%} of their free memory); the "
        f"{len(free)} visible GPU(s) have {have} GiB free. Use more GPUs (CUDA_VISIBLE_DEVICES), --device cpu "
        f"(about {total / GiB:.0f} GiB of RAM), or serve the HF dir with a tensor-parallel engine "
        f"(e.g. `vllm serve DIR --tensor-parallel-size 8`).")


def cuda_free_memory() -> list[int]:
    """Free bytes of every visible GPU."""
    return [torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())]


def _to(x, device: torch.device):
    if isinstance(x, torch.Tensor):
        return x.to(device, non_blocking=True)
    if isinstance(x, (list, tuple)):
        return type(x)(_to(v, device) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.replace(x, **{f.name: _to(getattr(x, f.name), device) for f in dataclasses.fields(x)
                                         if f.init and isinstance(getattr(x, f.name), (torch.Tensor, tuple, list))})
    return x  # e.g. the KV cache: each layer keeps its own entries on its device


def place(model: nn.Module, devices: list[torch.device | str], *, materialize: bool = False) -> nn.Module:
    """Put unit i on devices[i] (`to_empty` for a meta model when `materialize`, else `.to`) and make each
    unit move its inputs there. Returns the model."""
    units = units_of(model)
    assert len(devices) == len(units), (len(devices), len(units))
    for (_, mods), device in zip(units, devices):
        device = torch.device(device)
        for m in mods:
            m.to_empty(device=device) if materialize else m.to(device)
            m.register_forward_pre_hook(lambda mod, args, kwargs, d=device: (_to(args, d), _to(kwargs, d)),
                                        with_kwargs=True)
    return model


def describe(devices: list, units: list[str]) -> str:
    """'cuda:0: vision tower + embedding .. decoder layer 11; cuda:1: decoder layer 12 .. final norm + lm head'."""
    spans: list[list] = []
    for name, d in zip(units, devices):
        if spans and spans[-1][0] == str(d):
            spans[-1][2] = name
        else:
            spans.append([str(d), name, name])
    return "; ".join(f"{d}: {a}" + (f" .. {b}" if b != a else "") for d, a, b in spans)
