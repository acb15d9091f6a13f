"""`mmtune plan`: per-GPU memory of a GLM-V finetune under FSDP2, before spending GPU hours (any
architecture of mmtune.models: GLM-4.5V / GLM-4.6V MoE, GLM-4.1V / GLM-4.6V-Flash dense).

  params.py         parameter counts from the model built on the meta device (and the LoRA adapters)
  activations.py    what autograd keeps per token and layer with mmtune's ops; one layer's backward
  estimate.py       the per-GPU rows, the step's peak over its phases, the verdict (`estimate`, `Plan`)
  communication.py  the routed experts' traffic with and without expert parallelism
  measure.py        a training step's measured peak on the CPU, which the tests hold the estimate to
  cli.py            the `mmtune plan` command
"""

from mmtune.plan.activations import decoder_layer_bytes_per_token, layer_working_bytes_per_token
from mmtune.plan.cli import frozen_from_model_json, load_config, main
from mmtune.plan.communication import communication
from mmtune.plan.estimate import GiB, Plan, estimate
from mmtune.plan.measure import LiveTensorBytes, measure_training_step
from mmtune.plan.params import AdapterCounts, ParamCounts, build_meta_model, count_adapters, count_params

__all__ = ["AdapterCounts", "GiB", "LiveTensorBytes", "ParamCounts", "Plan", "build_meta_model", "communication",
           "count_adapters", "count_params", "decoder_layer_bytes_per_token", "estimate", "frozen_from_model_json",
           "layer_working_bytes_per_token", "load_config", "main", "measure_training_step"]
