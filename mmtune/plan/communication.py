"""The routed experts' communication per GPU, with and without expert parallelism (docs/INTERNALS.md
"Expert parallelism"). The sharded state is the same either way (the experts are split over all GPUs:
EP groups x efsdp), but the traffic differs:
  without EP  every GPU all-gathers every expert in forward and again in backward (reshard after forward),
              and reduce-scatters their gradients;
  with EP     each GPU all-gathers only its E/EP experts over the efsdp = GPUs/EP ranks, and sends its
              tokens' rows to the experts' GPUs and back (all-to-all): forward, the recomputed forward
              (recompute full), and backward.
`communication()` counts the bytes each GPU sends per micro-batch (ring collectives: (n-1)/n of the data;
all-to-all: the (EP-1)/EP of the rows that are remote under balanced routing).
"""

from __future__ import annotations

from mmtune.plan.activations import DTYPE_BYTES
from mmtune.plan.params import ParamCounts
from mmtune.train.freeze import MODULES


def communication(config, params: ParamCounts, *, gpus: int, ep: int, tokens: int,
                  compute_dtype: str = "bf16", recompute: str = "full", reduce_bytes: int = 4,
                  frozen: tuple[str, ...] = ()) -> dict[str, float]:
    """Bytes one GPU sends for the routed experts (see the module docstring): per micro-batch of `tokens`
    tokens their all-gathers (forward + backward), with ep > 1 the token all-to-all, and the reduce-scatter
    of their gradients (`reduce_bytes` per value; every micro-batch reduce-scatters, see grad accumulation)."""
    t = config.text
    c = DTYPE_BYTES[compute_dtype]
    moe_layers = sum(t.is_moe_layer(i) for i in range(t.num_hidden_layers))
    efsdp = gpus // ep
    local = params.experts / ep  # expert parameters one ep rank owns (sharded over its efsdp ranks)
    ring = (efsdp - 1) / efsdp
    backward = any(m not in frozen for m in MODULES)  # something trains: backward runs through the decoder
    out = {"experts all-gather (per micro-batch)": local * c * ring * (1 + backward),
           "token all-to-all (per micro-batch)": 0.0,
           "experts reduce-scatter (per micro-batch)": local * reduce_bytes * ring if "text_decoder" not in frozen else 0.0}
    if ep > 1:
        rows = tokens * t.num_experts_per_tok * (ep - 1) / ep  # rows leaving this GPU in one dispatch
        row = 2 * t.hidden_size * c + 4  # the row there and its output back, plus its fp32 routing weight
        passes = 1 + (backward and recompute == "full") + backward  # forward, recomputed forward, backward
        out["token all-to-all (per micro-batch)"] = moe_layers * rows * row * passes
    return out
