"""Profiling driven by the recipe's tools.json (`--mm-tool tools.json`).

MindSpeed-MM's tools.json has a "profile" section (enable, profile_type static|dynamic, ranks, and a
"static_param" block with start/end steps, save path and what to record) and a "memory_snapshot" section.
mmtune reads the same layout and maps it onto torch.profiler and the CUDA caching-allocator snapshot:

    {
      "profile": {
        "enable": true,
        "profile_type": "static",          # only "static" (fixed steps) is supported
        "ranks": [0],                      # [-1] = every rank
        "static_param": {
          "start_step": 3, "end_step": 5,  # profile steps start_step .. end_step-1 (1-based step numbers)
          "save_path": "./profiling",      # traces: <save_path>/rank<r>_step<a>-<b>.pt.trace.json
          "with_cpu": true, "with_stack": false, "with_memory": false, "record_shapes": false,
          "level": "level1", "aic_metrics_type": "...", "data_simplification": false   # NPU-only: ignored
        }
      },
      "memory_snapshot": {
        "enable": true, "ranks": [0], "start_step": 1, "stop_step": 2, "max_entries": 100000,
        "save_path": "./memory_snapshot"   # CUDA only: <save_path>/rank<r>_step<stop>.pickle
      }
    }

Unknown keys raise ValueError naming them; NPU-only keys are accepted and ignored.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

_NPU_ONLY = {"level", "aic_metrics_type", "data_simplification", "analyse", "export_type"}
_STATIC_KEYS = {"start_step", "end_step", "save_path", "with_cpu", "with_stack", "with_memory", "record_shapes"} | _NPU_ONLY
_PROFILE_KEYS = {"enable", "profile_type", "ranks", "static_param", "dynamic_param", "level"}
_SNAPSHOT_KEYS = {"enable", "ranks", "start_step", "stop_step", "max_entries", "save_path"}


@dataclass
class ProfileConfig:
    enable: bool = False
    ranks: tuple[int, ...] = (-1,)
    start_step: int = 10
    end_step: int = 12
    save_path: str = "./profiling"
    with_cpu: bool = True
    with_stack: bool = False
    with_memory: bool = False
    record_shapes: bool = False
    snapshot_enable: bool = False
    snapshot_ranks: tuple[int, ...] = (0,)
    snapshot_start: int = 1
    snapshot_stop: int = 2
    snapshot_max_entries: int = 100000
    snapshot_path: str = "./memory_snapshot"


def _check_keys(where: str, got: dict, allowed: set[str], path: Path) -> None:
    unknown = sorted(set(got) - allowed)
    if unknown:
        raise ValueError(f"{path}: unknown key(s) {unknown} in {where}; allowed: {sorted(allowed)}")


def load_tools_json(path: str | Path) -> ProfileConfig:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--mm-tool {path}: no such file")
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    cfg = ProfileConfig()
    prof = data.get("profile") or {}
    _check_keys("profile", prof, _PROFILE_KEYS, path)
    cfg.enable = bool(prof.get("enable", False))
    if cfg.enable and prof.get("profile_type", "static") != "static":
        raise ValueError(f"{path}: profile.profile_type {prof.get('profile_type')!r} is not supported; use \"static\"")
    cfg.ranks = tuple(int(r) for r in prof.get("ranks", [-1]))
    static = prof.get("static_param") or {}
    _check_keys("profile.static_param", static, _STATIC_KEYS, path)
    for key in ("start_step", "end_step"):
        if key in static:
            setattr(cfg, key, int(static[key]))
    for key in ("save_path", "with_cpu", "with_stack", "with_memory", "record_shapes"):
        if key in static:
            setattr(cfg, key, type(getattr(cfg, key))(static[key]))
    if cfg.enable and cfg.end_step <= cfg.start_step:
        raise ValueError(f"{path}: profile.static_param end_step ({cfg.end_step}) must exceed start_step ({cfg.start_step})")
    snap = data.get("memory_snapshot") or {}
    _check_keys("memory_snapshot", snap, _SNAPSHOT_KEYS, path)
    cfg.snapshot_enable = bool(snap.get("enable", False))
    cfg.snapshot_ranks = tuple(int(r) for r in snap.get("ranks", [0]))
    cfg.snapshot_start = int(snap.get("start_step", cfg.snapshot_start))
    cfg.snapshot_stop = int(snap.get("stop_step", cfg.snapshot_stop))
    cfg.snapshot_max_entries = int(snap.get("max_entries", cfg.snapshot_max_entries))
    cfg.snapshot_path = str(snap.get("save_path", cfg.snapshot_path))
    unknown = sorted(set(data) - {"profile", "memory_snapshot", "sora_extract"})
    if unknown:
        raise ValueError(f"{path}: unknown top-level key(s) {unknown}; mmtune reads 'profile' and 'memory_snapshot'")
    return cfg


def _selected(ranks: tuple[int, ...], rank: int) -> bool:
    return -1 in ranks or rank in ranks


class Profiler:
    """Call `step_begin(step)` before and `step_end(step)` after each optimizer step (1-based numbers)."""

    def __init__(self, cfg: ProfileConfig | None, rank: int, device: torch.device, print_fn=print):
        self.cfg = cfg or ProfileConfig()
        self.rank = rank
        self.device = device
        self.print = print_fn
        self.prof = None
        self.written: list[Path] = []
        self.profiling = self.cfg.enable and _selected(self.cfg.ranks, rank)
        self.snapshot = self.cfg.snapshot_enable and device.type == "cuda" and _selected(self.cfg.snapshot_ranks, rank)

    def step_begin(self, step: int) -> None:
        if self.profiling and step == self.cfg.start_step and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU] if self.cfg.with_cpu else []
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities or None, record_shapes=self.cfg.record_shapes,
                                               profile_memory=self.cfg.with_memory, with_stack=self.cfg.with_stack)
            self.prof.__enter__()
        if self.snapshot and step == self.cfg.snapshot_start:
            torch.cuda.memory._record_memory_history(max_entries=self.cfg.snapshot_max_entries)

    def step_end(self, step: int) -> None:
        if self.prof is not None and step == self.cfg.end_step - 1:
            self.prof.__exit__(None, None, None)
            out = Path(self.cfg.save_path) / f"rank{self.rank}_step{self.cfg.start_step}-{self.cfg.end_step - 1}.pt.trace.json"
            out.parent.mkdir(parents=True, exist_ok=True)
            self.prof.export_chrome_trace(str(out))
            self.written.append(out)
            self.print(f"profiler: wrote {out}", flush=True)
            self.prof = None
        if self.snapshot and step == self.cfg.snapshot_stop:
            out = Path(self.cfg.snapshot_path) / f"rank{self.rank}_step{step}.pickle"
            out.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(out))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.written.append(out)
            self.print(f"memory snapshot: wrote {out}", flush=True)

    def close(self) -> None:
        if self.prof is not None:
            self.prof.__exit__(None, None, None)
            self.prof = None
