"""Mixture-of-experts pieces of GLM-4.5V: the sigmoid top-k router and the stacked routed experts.

Router (docs/GLM45V.md section 5), all in fp32: scores = sigmoid(x W^T); experts are *chosen* on
scores + e_score_correction_bias (group-limited: keep the `topk_group` groups with the best sum of
their top-2 biased scores, then the top-k experts inside them); the *weights* are the unbiased scores
of the chosen experts, optionally normalised to sum 1, times `routed_scaling_factor`.

Experts: one tensor per projection, `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj`
[E, H, I], as transformers>=5 keeps them in memory. The forward sorts the (token, slot) pairs by expert
once and runs each projection as one grouped matmul over the sorted rows (`grouped_mm`); where the
platform has no grouped matmul for the dtype, or `use_grouped_mm` is off (model.json use_npu_fused_moe:
false), it loops over the experts that got tokens.

The one seam for parallelism: `GroupedExperts.dispatch` takes the expert-sorted rows, their routing
weights, the rows per expert and the two weight tensors and returns the rows' expert outputs. The
default, `expert_ffn`, runs every expert here; expert parallelism (distributed/expert_parallel.py)
replaces it with an all-to-all to the ranks that own the experts.

Legend: T tokens, H hidden, E experts, K experts per token, I expert intermediate size, R = T*K rows.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from mmtune.ops.fused import unpermute_sum
from mmtune.ops.grouped_mm import _GROUPED_MM, grouped_mm


class TopKRouter(nn.Module):
    """`mlp.gate`: weight [E, H] and the persistent fp32 buffer `e_score_correction_bias` [E]."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        n_group: int = 1,
        topk_group: int = 1,
        norm_topk_prob: bool = True,
        routed_scaling_factor: float = 1.0,
    ):
        super().__init__()
        if num_experts % n_group:
            raise ValueError(f"n_routed_experts ({num_experts}) must be a multiple of n_group ({n_group})")
        if not 1 <= topk_group <= n_group:
            raise ValueError(f"topk_group ({topk_group}) must be in 1..n_group ({n_group})")
        if top_k > topk_group * num_experts // n_group:
            raise ValueError(f"num_experts_per_tok ({top_k}) exceeds the experts of the top {topk_group} groups")
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))

    def forward(self, x_TH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns router logits [T, E] (fp32), expert weights [T, K] (fp32) and expert ids [T, K]."""
        logits_TE = F.linear(x_TH.float(), self.weight.float())
        scores_TE = logits_TE.sigmoid()
        experts_TK = self.choose(scores_TE)
        weights_TK = scores_TE.gather(1, experts_TK)
        if self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(-1, keepdim=True) + 1e-20)
        return logits_TE, weights_TK * self.routed_scaling_factor, experts_TK

    @torch.no_grad()
    def choose(self, scores_TE: torch.Tensor) -> torch.Tensor:
        """The experts [T, K] each token goes to: top-k of the biased scores within the best groups.
        (Also used outside the forward to count the experts' loads from the router logits.)"""
        choice_TE = scores_TE + self.e_score_correction_bias
        if self.topk_group < self.n_group:
            groups_TGe = choice_TE.view(-1, self.n_group, self.num_experts // self.n_group)
            group_score_TG = groups_TGe.topk(2, dim=-1).values.sum(-1)
            keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_score_TG.topk(self.topk_group, dim=-1).indices, True)
            choice_TE = groups_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view_as(choice_TE)
        return choice_TE.topk(self.top_k, dim=-1).indices

    def expert_load(self, logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens per expert [E] (int64) for router logits of a forward (`token_mask_T`: the tokens to count)."""
        experts_TK = self.choose(logits_TE.detach().float().sigmoid())
        if token_mask_T is not None:
            experts_TK = experts_TK[token_mask_T.reshape(-1)]
        return torch.bincount(experts_TK.reshape(-1), minlength=self.num_experts)


class GroupedExperts(nn.Module):
    """`mlp.experts`: E SwiGLU experts stored as stacked tensors.

    `forward` sorts the (token, slot) rows by expert, hands them with the per-expert counts to `dispatch`
    (default `expert_ffn`, every expert here; expert parallelism swaps in an all-to-all that runs
    `expert_ffn` on the ranks owning the experts), and returns the outputs to token order. `expert_ffn`
    reaches each projection's weight only through `project`, so LoRA on the experts (ops/lora.py:
    `projection()` returns the weight with its adapters) runs wherever `expert_ffn` runs."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        # (x_RH, w_R1, counts_E, gate_up, down) -> y_RH, the weights as `projection()` gives them; see the
        # module docstring
        self.dispatch = expert_ffn
        self.use_grouped_mm = True  # False: a loop over experts (training sets model.json's use_npu_fused_moe)

    def projection(self, name: str):
        """What `project` applies for projection `name` ("gate_up_proj" | "down_proj"): its stacked weight."""
        return getattr(self, name)

    def forward(self, x_TH: torch.Tensor, weights_TK: torch.Tensor, experts_TK: torch.Tensor) -> torch.Tensor:
        T, K = experts_TK.shape
        # sort the T*K (token, slot) rows by expert once; both projections run over the sorted rows
        order_R = experts_TK.view(-1).argsort(stable=True)
        inverse_R = torch.empty_like(order_R)
        inverse_R[order_R] = torch.arange(order_R.numel(), device=order_R.device)
        counts_E = expert_counts(experts_TK, self.num_experts)
        token_R = order_R // K
        x_RH = x_TH.index_select(0, token_R)
        w_R1 = weights_TK.view(-1)[order_R, None]
        gate_up, down = self.projection("gate_up_proj"), self.projection("down_proj")
        if self.use_grouped_mm:
            y_RH = self.dispatch(x_RH, w_R1, counts_E, gate_up, down)
        else:
            with _grouped_mm_off():
                y_RH = self.dispatch(x_RH, w_R1, counts_E, gate_up, down)
        # back to (token, slot) order and sum the K slots: gathers, not scatter-adds, forward and backward
        return unpermute_sum(y_RH, inverse_R, token_R, K).to(x_TH.dtype)


def expert_counts(experts_TK: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows per expert [E] (int64). A scatter-add, not `bincount`: its output shape does not depend on
    the data, so torch.compile traces it without a graph break."""
    ids_R = experts_TK.reshape(-1)
    return ids_R.new_zeros(num_experts).scatter_add_(0, ids_R, torch.ones_like(ids_R))


def expert_ffn(x_RH: torch.Tensor, w_R1: torch.Tensor, counts_E: torch.Tensor, gate_up, down) -> torch.Tensor:
    """SwiGLU of expert e over the e-th block of rows (counts_E[e] rows, blocks in expert order), each
    row's output scaled by its routing weight. gate_up [E, 2I, H] and down [E, H, I]: stacked weights,
    or their LoRA projections (see `project`)."""
    h_RI2 = project(x_RH, gate_up, counts_E)
    gate_RI, up_RI = h_RI2.chunk(2, dim=-1)
    # the routing weight scales the (narrower) down-projection input: the same as scaling its output
    return project((F.silu(gate_RI) * up_RI * w_R1).to(h_RI2.dtype), down, counts_E)


def project(x_RIn: torch.Tensor, weight, counts_E: torch.Tensor) -> torch.Tensor:
    """The sorted rows through their expert's projection: `weight` is a stacked [E, Out, In] tensor, or an
    object with `.project(x_RIn, counts_E)` (ops/lora.LoRAProjection: the weight plus its adapters)."""
    if isinstance(weight, torch.Tensor):
        return grouped_linear(x_RIn, weight, counts_E)
    return weight.project(x_RIn, counts_E)


# > 0 while a GroupedExperts with use_grouped_mm off runs its dispatch (which may be the expert-parallel
# all-to-all, so the switch travels with the call rather than through every signature). A plain module
# global: torch.compile reads it as a guarded constant, where a ContextVar would break the graph.
_LOOP_DEPTH = 0


@contextlib.contextmanager
def _grouped_mm_off():
    global _LOOP_DEPTH
    _LOOP_DEPTH += 1
    try:
        yield
    finally:
        _LOOP_DEPTH -= 1


def grouped_linear(x_RIn: torch.Tensor, w_EOutIn: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """`x @ w[e].T` for consecutive row blocks of `x` (block e has counts_E[e] rows). One grouped matmul
    where `torch` has one for this device/dtype/layout (and `GroupedExperts.use_grouped_mm` is on); otherwise
    a loop over experts with rows."""
    x_RIn = x_RIn.to(w_EOutIn.dtype)
    if _LOOP_DEPTH == 0 and _grouped_mm_ok(x_RIn, w_EOutIn):
        offs_E = torch.cumsum(counts_E, 0, dtype=torch.int32)
        return grouped_mm(x_RIn, w_EOutIn.transpose(1, 2), offs_E)
    return _expert_loop(x_RIn, w_EOutIn, counts_E)


@torch.compiler.disable
def _expert_loop(x_RIn: torch.Tensor, w_EOutIn: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """grouped_linear as one matmul per expert with rows. Its shapes depend on the counts' values, which a
    compiled graph cannot branch on: under torch.compile it runs eagerly (a graph break; the grouped path
    has none)."""
    outs, start = [], 0
    for e, n in enumerate(counts_E.tolist()):
        if n:
            outs.append(x_RIn[start : start + n] @ w_EOutIn[e].T)
            start += n
    if not outs:  # no rows: an empty matmul, so the weight still gets a (zero) gradient. Under expert
        # parallelism a rank's experts can receive no row while FSDP reduces their gradients on every rank.
        return x_RIn[:0] @ w_EOutIn[0].T
    return torch.cat(outs)


def _grouped_mm_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    """torch's grouped matmul: CUDA needs bf16 on SM80+, the CPU fp32/bf16/fp16 (it has no fp64 kernel);
    every device needs 16-byte-aligned rows and base pointers (torch<=2.10 on CPU checks the pointers, and
    memory-mapped weights may not be)."""
    if _GROUPED_MM is None or x.shape[0] == 0:
        return False
    if x.is_cuda:
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    elif x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    esize = x.element_size()
    shapes_ok = (x.shape[1] * esize) % 16 == 0 and (w.shape[1] * esize) % 16 == 0 and (w.shape[2] * esize) % 16 == 0
    if torch.compiler.is_compiling():  # traced tensors have no address; the compiler allocates aligned buffers
        return shapes_ok
    return shapes_ok and x.data_ptr() % 16 == 0 and w.data_ptr() % 16 == 0
