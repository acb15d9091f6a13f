"""The install contract: runtime dependencies are what mmtune's default path needs (jinja2 too: transformers
renders the chat template with it), the torch floor is the tested version, and TensorBoard (an extra) is
optional with one line saying so when it is missing."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _project() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req, maxsplit=1)[0].lower()


def test_runtime_dependencies_and_torch_floor():
    project = _project()
    deps = {_name(r): r for r in project["dependencies"]}
    # TensorBoard is an extra (of its own), never imported directly
    assert "tensorboard" not in deps
    assert [_name(r) for r in project["optional-dependencies"]["tensorboard"]] == ["tensorboard"]
    sources = "\n".join(p.read_text() for p in (REPO / "mmtune").rglob("*.py"))
    assert not re.search(r"^\s*(import|from)\s+tensorboard\b", sources, re.M)
    # the floor is the version the suite runs on (README says torch==2.13.0 is the tested one)
    floor = re.search(r">=\s*([0-9.]+)", deps["torch"]).group(1)
    assert torch.__version__.split("+")[0].startswith(floor + "."), (floor, torch.__version__)
    assert f"torch=={floor}." in (REPO / "README.md").read_text()


def test_ci_installs_and_tests_as_the_readme_says():
    """.ci/run runs README's "Install and run the tests" command, step by step, then the wheel demo."""
    readme = (REPO / "README.md").read_text()
    command = re.search(r"Install and run the tests:\s*```bash\n(.+?)\n```", readme, re.S).group(1)
    steps = [step.strip() for step in command.split("&&")]
    assert steps[2:4] == ["pip install torch==2.13.0", "pip install -e '.[test]'"], steps
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    at = ci.index(steps[0])
    assert ci[at : at + len(steps)] == steps, ci
    assert ci[at + len(steps):] == ["PYTHON=python .ci/wheel_demo.sh"], ci


def test_jinja2_is_a_runtime_dependency_because_the_chat_template_needs_it(tmp_path, monkeypatch):
    """mmtune generate and the demo's evaluation encode the prompt with transformers' apply_chat_template,
    which renders the tokenizer's jinja chat template; transformers does not require jinja2 (torch 2.13 happens
    to, without a version), so mmtune lists it itself."""
    from transformers import AutoTokenizer
    from transformers.utils import chat_template_utils

    from mmtune.data.tokenizer_tiny import save_tiny_tokenizer
    from mmtune.generate import build_messages, encode_prompt

    save_tiny_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    image_id = tok.convert_tokens_to_ids("<|image|>")
    assert "apply_chat_template" in (REPO / "mmtune" / "generate.py").read_text()
    assert encode_prompt(tok, build_messages("<image>what is it?", 1), [2], image_id)  # renders with jinja2
    # without jinja2 the same prompt cannot be encoded: mmtune needs it at run time
    monkeypatch.setattr(chat_template_utils, "is_jinja_available", lambda: False)
    chat_template_utils._compile_jinja_template.cache_clear()
    with pytest.raises(ImportError, match="jinja2"):
        encode_prompt(tok, build_messages("<image>what is it?", 1), [2], image_id)
    requirement = {_name(r): r for r in _project()["dependencies"]}.get("jinja2")
    assert requirement is not None, "jinja2 must be in pyproject's runtime dependencies"
    # transformers refuses jinja2 older than 3.1.6 for apply_chat_template
    assert re.search(r">=\s*3\.1\.([6-9]|\d\d)", requirement), requirement


def test_metrics_without_tensorboard_says_so_once(tmp_path, monkeypatch):
    from mmtune.train.metrics import MetricsLogger

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` raises ImportError
    lines = []
    m = MetricsLogger(metrics_file=tmp_path / "metrics.jsonl", tensorboard_dir=tmp_path / "tb", train_iters=1,
                      flops_per_token=None, device=torch.device("cpu"), world_size=1, enabled=True,
                      print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert m.tb is None and not (tmp_path / "tb").exists()
    assert len(lines) == 1 and "mmtune[tensorboard]" in lines[0]
