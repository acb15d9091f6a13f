"""Checkpoint conversion HF (hub layout) <-> DCP (native names), streaming. See hf_to_dcp.py, dcp_to_hf.py."""

from mmtune.convert.dcp_io import MODEL_PREFIX, OPTIM_PREFIX, model_prefix, resolve_dcp_dir
from mmtune.convert.dcp_to_hf import dcp_to_hf
from mmtune.convert.hf_to_dcp import hf_to_dcp

__all__ = ["MODEL_PREFIX", "OPTIM_PREFIX", "dcp_to_hf", "hf_to_dcp", "model_prefix", "resolve_dcp_dir"]
