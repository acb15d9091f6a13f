"""Shared fixtures. Nothing here reaches a hub: HF_HUB_OFFLINE is set before transformers is imported."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory):
    """`mmtune make-tiny` output (hub layout), made once per test session."""
    from mmtune.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny") / "GLM-4.5V-tiny", seed=0)


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    """`mmtune data make-shapes` output: DIR/images/*.png and DIR/llava_format.json."""
    from mmtune.data.shapes import make_shapes

    out = tmp_path_factory.mktemp("shapes")
    make_shapes(out, num=64, seed=0)
    return out


@pytest.fixture(scope="session")
def tiny_dense_hf_dir(tmp_path_factory):
    """`mmtune make-tiny --arch glm4v` output: the dense GLM-4.1V-architecture tiny model, made once."""
    from mmtune.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("tiny_dense") / "GLM-4.1V-tiny", seed=0, arch="glm4v")
