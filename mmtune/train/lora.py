"""LoRA for training: which modules get adapters (`--lora-target-modules`), applying them from outside the
model, freezing the base, deterministic adapter init, and the adapter metadata a checkpoint carries.

Targets are module names as in our (= transformers') model: a name selects every adaptable module whose
last name component is it (`q_proj` -> each decoder layer's `self_attn.q_proj`; `gate_proj` -> the dense
MLPs', the shared experts' and, when the vision tower trains, the vision MLPs' and the merger's), or that
sits inside a module of that name (`shared_experts` -> its gate/up/down projections). `experts` selects
the stacked routed experts (both projections, one adapter per expert; ops/lora.py). `all-linear` is every
nn.Linear plus the routed experts. Never adapted: the router `gate` (routing stays as pretrained; it is
not a Linear either), the embeddings and the lm head (the chunked loss reads the head's weight directly).

The model.json freeze flags still apply on top: a module they freeze gets no adapter (the recipe's
defaults freeze the vision tower, so LoRA goes to the text decoder); every base parameter is frozen, and
only the adapters train. Unknown names, and names that only match frozen modules, are errors that list
what is valid.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from mmtune.ops.lora import (
    LoRAGroupedExperts,
    LoRALinear,
    adapter_pairs,
    init_lora_,
    is_adapter_name,
    lora_delta,
    wrap_experts,
    wrap_linear,
)
from mmtune.ops.moe import GroupedExperts
from mmtune.train.freeze import FreezeSpec, module_of

ALL_LINEAR = "all-linear"
DEFAULT_ALPHA = 32.0
DEFAULT_TARGETS = (ALL_LINEAR,)
NEVER = {
    "gate": "the MoE router: routing stays as pretrained (all-linear leaves it out too)",
    "lm_head": "the lm head: the chunked loss reads its weight directly, so an adapter there would be skipped",
    "embed_tokens": "the token embedding is not a Linear",
}
_FREEZE_KEYS = {"vision_encoder": "image_encoder.vision_encoder.freeze",
                "vision_projector": "image_encoder.vision_projector.freeze",
                "text_decoder": "text_decoder.freeze"}


@dataclass(frozen=True)
class LoRAConfig:
    """--lora-r, --lora-alpha, --lora-dropout, --lora-target-modules."""

    r: int
    alpha: float = DEFAULT_ALPHA
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"--lora-r must be an integer >= 1 (the adapter rank), got {self.r!r}")
        if not self.alpha > 0:
            raise ValueError(f"--lora-alpha must be > 0 (the update is scaled by alpha / r), got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError(f"--lora-target-modules needs at least one name (or {ALL_LINEAR})")
        object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(r=int(d["r"]), alpha=float(d["alpha"]), dropout=float(d["dropout"]), targets=tuple(d["targets"]))


@dataclass
class LoRAInfo:
    """What `apply_lora` did: the adapted module names ("linear" / "experts") and the parameter counts."""

    config: LoRAConfig
    modules: dict[str, str] = field(default_factory=dict)
    trainable: int = 0
    frozen: int = 0


# ------------------------------------------------------------------------------------------ targets


def _adaptable(model: nn.Module) -> dict[str, nn.Module]:
    """Every module LoRA can wrap: nn.Linear (except the lm head) and the stacked routed experts."""
    head = getattr(model, "lm_head", None)
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) and m is not head) or isinstance(m, GroupedExperts)}


def _matches(name: str, target: str) -> bool:
    return target in name.split(".")


def valid_targets(model: nn.Module) -> list[str]:
    """The names `--lora-target-modules` accepts for this model: each adaptable module's last name, the
    containers `shared_experts`, and `all-linear`."""
    names = set()
    for name in _adaptable(model):
        parts = name.split(".")
        names.add(parts[-1])
        names.update(p for p in parts[:-1] if p == "shared_experts")
    return sorted(names) + [ALL_LINEAR]


def resolve_targets(model: nn.Module, cfg: LoRAConfig, freeze: FreezeSpec | None = None) -> dict[str, str]:
    """module name -> "linear" | "experts" for every module that gets an adapter (see the module doc)."""
    adaptable = _adaptable(model)
    valid = valid_targets(model)
    frozen = (lambda name: getattr(freeze, module_of(name + ".weight"))) if freeze else (lambda name: False)
    chosen: dict[str, str] = {}
    for target in cfg.targets:
        if target in NEVER:
            raise ValueError(f"--lora-target-modules {target}: not a LoRA target ({NEVER[target]}); "
                             f"valid: {' '.join(valid)}")
        if target not in valid:
            raise ValueError(f"--lora-target-modules {target}: no module of this model has that name; "
                             f"valid: {' '.join(valid)}")
        hits = [n for n in adaptable if target == ALL_LINEAR or _matches(n, target)]
        live = [n for n in hits if not frozen(n)]
        if not live:
            owners = sorted({module_of(n + ".weight") for n in hits})
            raise ValueError(f"--lora-target-modules {target}: it only matches modules that model.json freezes "
                             f"({', '.join(_FREEZE_KEYS[o] + ' true' for o in owners)}); set that to false to "
                             "put adapters there, or choose other targets")
        for n in live:
            chosen[n] = "experts" if isinstance(adaptable[n], GroupedExperts) else "linear"
    return dict(sorted(chosen.items()))


# ------------------------------------------------------------------------------------------ apply


def apply_lora(model: nn.Module, cfg: LoRAConfig, freeze: FreezeSpec | None = None) -> LoRAInfo:
    """Swap LoRA modules in for the targets (same base parameters and names), freeze every base parameter
    and make the adapters trainable. Works on a meta-device model (before sharding) or a real one; the
    adapters start at zero — `init_adapters` gives them their initial values."""
    chosen = resolve_targets(model, cfg, freeze)
    for name, kind in chosen.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        new = (wrap_experts(old, cfg.r, cfg.alpha, cfg.dropout) if kind == "experts"
               else wrap_linear(old, cfg.r, cfg.alpha, cfg.dropout))
        setattr(parent, child, new)
    info = LoRAInfo(cfg, chosen)
    for name, p in model.named_parameters():
        p.requires_grad_(is_adapter_name(name))
        if p.requires_grad:
            info.trainable += p.numel()
        else:
            info.frozen += p.numel()
    return info


@torch.no_grad()
def init_adapters(model: nn.Module, seed: int) -> None:
    """A ~ kaiming-uniform, B = 0 (ops/lora.init_lora_) for every adapter, each from its own generator
    seeded by (seed, its name): the values do not depend on which other modules are adapted, on the
    device, or on how the parameters are sharded (each rank keeps its shard of the same full tensor)."""
    for name, module in model.named_modules():
        for base, A, B in adapter_pairs(module):
            key = f"{name}.{base}"
            gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
            full_A, full_B = torch.empty(A.shape), torch.empty(B.shape)
            init_lora_(full_A, full_B, gen)
            _copy_full(A, full_A)
            _copy_full(B, full_B)


def _copy_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full CPU tensor into a parameter, or into this rank's shard of a DTensor parameter."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        local = distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements,
                                  src_data_rank=None).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(full.to(param.device, param.dtype))


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every adapter folded in (W + s B A), adapter keys dropped: what
    `mmtune convert dcp-to-hf` writes for a LoRA run, for an unsharded model in memory."""
    sd = {k: v.clone() for k, v in model.state_dict().items() if not is_adapter_name(k)}
    for name, module in model.named_modules():
        for base, A, B in adapter_pairs(module):
            key = f"{name}.{base}"
            sd[key] = (sd[key].double() + lora_delta(A.double(), B.double(), module.scale)).to(sd[key].dtype)
    return sd


# ------------------------------------------------------------------------------------------ metadata


def metadata(cfg: LoRAConfig, modules: dict[str, str], base: dict | None = None) -> bytes:
    """The JSON blob a LoRA checkpoint stores under the key `lora` (docs/INTERNALS.md "LoRA"): the config,
    the adapted modules (name -> "linear" | "experts") and where the base weights came from."""
    return json.dumps({"format": 1, **cfg.to_dict(), "modules": modules, "base": base or {}}, indent=1).encode()


def read_metadata(blob: bytes) -> dict:
    return json.loads(bytes(blob).decode())


def lora_modules(model: nn.Module) -> dict[str, str]:
    """module name -> "linear" | "experts" for every module that carries adapters."""
    return {name: "experts" if isinstance(m, LoRAGroupedExperts) else "linear"
            for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAGroupedExperts))}
