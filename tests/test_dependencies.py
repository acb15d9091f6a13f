"""The install contract: runtime dependencies are what mmtune's default path imports, the torch floor is the
tested version, and TensorBoard (an extra) is optional with one line saying so when it is missing."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def test_runtime_dependencies_and_torch_floor():
    project = _project()
    deps = {_name(r): r for r in project["dependencies"]}
    # jinja2 is never imported by mmtune (its chat format is rendered in data/template.py); TensorBoard is an extra
    assert "jinja2" not in deps and "tensorboard" not in deps
    assert "tensorboard" in {_name(r) for r in project["optional-dependencies"]["tensorboard"]}
    sources = "\n".join(p.read_text() for p in (REPO / "mmtune").rglob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+jinja2\b", sources, re.M)
    assert not re.search(r"^\s*(import|from)\s+tensorboard\b", sources, re.M)
    # the floor is the version the suite runs on (README says torch==2.13.0 is the tested one)
    floor = re.search(r">=\s*([0-9.]+)", deps["torch"]).group(1)
    assert torch.__version__.split("+")[0].startswith(floor + "."), (floor, torch.__version__)
    assert f"torch=={floor}." in (REPO / "README.md").read_text()


def test_metrics_without_tensorboard_says_so_once(tmp_path, monkeypatch):
    from mmtune.train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    lines = []
    m = MetricsLogger(metrics_file=tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb", train_iters=1,
                      flops_per_token=None, device=torch.device("cpu"), world_size=1, enabled=True,
                      print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert m.tb is None and not (tmp_path / "tb").exists()
    assert len(lines) == 1 and "mmtune[tensorboard]" in lines[0]
