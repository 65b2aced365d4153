"""SparseMLP: a mixture-of-experts MLP, a router sending each token to k of E gated experts.

Layout (names make import from Mixtral / Qwen3-MoE checkpoints a rename and a split):
- `router.weight` (E, H): HF's `gate.weight`.
- `w_gate`, `w_up` (E, I, H) and `w_down` (E, H, I): each expert's matrices as nn.Linear stores
  them, (out, in). HF's fused `experts.gate_up_proj` (E, 2I, H) is [w_gate | w_up] along dim 1;
  `experts.down_proj` is w_down as is. No biases. An expert computes
  down(act(gate(x)) * up(x)), act = silu (model.mlp=swiglu) or tanh GELU (geglu).

Routing is transformers' (MixtralTopKRouter, Qwen3MoeTopKRouter): probabilities softmax(logits) in
fp32, their top k, divided by their sum when model.moe_norm_topk (always for Mixtral; Qwen3-MoE's
norm_topk_prob). Dropless token choice: every token reaches its k experts, there is no capacity.
The routing weights stay fp32 (Mixtral's; Qwen3-MoE rounds them to the hidden dtype first, the same
in fp32), the weighted expert outputs are summed over k in fp32 and cast to x's dtype once.

The N k (token, expert) slots are sorted by expert, so each expert's tokens are one contiguous slice:
model.moe_impl=loop runs one matmul per expert over its slice, grouped one torch._grouped_mm over
all slices, auto the grouped one where it has its fast kernel (CUDA compute capability 9.x / 10.x,
bf16), else the loop. Memory is O(N k (H + I)): no (N, E, H) or (N, E, I) tensor is ever made.

After each forward the module keeps `router_logits` (N, E) fp32 with their graph, for
`load_balancing_loss`, and `last_topk` (N, k), detached, for `expert_load` / `load_max`.

Expert parallelism lives in trainer.parallel.expert: it keeps a contiguous block of experts here
(`keep_experts`) and installs `dispatch`, which sends every slot's token to the rank that owns its
expert and the result back; the router stays replicated. Nothing in this module knows ranks.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from trainer.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# Routing and its statistics


def route(logits: torch.Tensor, k: int, norm_topk: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits (N, E) -> routing weights (N, k) fp32 and expert indices (N, k)."""
    probs = torch.softmax(logits.float(), dim=-1)  # (N, E)
    weights, experts = torch.topk(probs, k, dim=-1)  # (N, k)
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def load_balancing_loss(router_logits: list[torch.Tensor], n_experts: int, top_k: int) -> torch.Tensor:
    """Switch Transformer's auxiliary loss, as transformers' load_balancing_loss_func (no attention
    mask): E * sum_e f_e P_e, f_e the top-k slots expert e got per token and P_e its mean router
    probability, both summed over all layers' rows before dividing by the rows (N per layer, not N k,
    so sum_e f_e = k). Balanced routing gives k; the gradient flows through P only."""
    device = router_logits[0].device
    counts = torch.zeros(n_experts, dtype=torch.float32, device=device)  # (E,) top-k slots per expert
    prob_sum = torch.zeros(n_experts, dtype=torch.float32, device=device)  # (E,)
    rows = 0
    for logits in router_logits:  # each (N, E)
        probs = torch.softmax(logits, dim=-1)  # (N, E)
        experts = torch.topk(probs, top_k, dim=-1).indices  # (N, k)
        ones = torch.ones(
            experts.numel(), dtype=torch.float32, device=device
        )  # scatter_add: no host sync (bincount has one on CUDA)
        counts = counts.scatter_add(0, experts.flatten(), ones)
        prob_sum = prob_sum + probs.float().sum(dim=0)
        rows += logits.shape[0]
    return n_experts * torch.sum((counts / rows) * (prob_sum / rows))


def expert_load(topk: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The share of the token slots each expert got (E,), summing to 1, from indices (N, k)."""
    return torch.bincount(topk.flatten(), minlength=n_experts).float() / topk.numel()


def load_max(topk: torch.Tensor, n_experts: int) -> float:
    """The busiest expert's share over the mean share 1/E: 1.0 is perfectly balanced, E/k means
    every token went to the same k experts."""
    return expert_load(topk, n_experts).max().item() * n_experts  # host sync


# ---------------------------------------------------------------------------------------------
# Experts over tokens sorted by expert


def sort_by_expert(ids: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat expert indices (S,) -> the stable permutation that sorts them (S,), and where each
    expert's slice ends in the sorted order (E,) int32 (torch._grouped_mm's offsets)."""
    sorted_ids, order = torch.sort(ids, stable=True)
    bounds = torch.arange(1, n_experts + 1, device=ids.device)
    return order, torch.searchsorted(sorted_ids, bounds, out_int32=True)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matmuls run in: autocast's where it is on, else x's own."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def grouped_mm_supported(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm has its fast kernel for x: bf16 on CUDA compute capability 9.x or
    10.x. Elsewhere it falls back to a loop of its own with a host sync, or (on a CPU) fails in
    backward on stride checks, so the loop here is the better choice."""
    if x.device.type != "cuda" or compute_dtype(x) != torch.bfloat16 or not hasattr(torch, "_grouped_mm"):
        return False
    return torch.cuda.get_device_capability(x.device)[0] in (9, 10)


class SparseMLP(nn.Module):
    """Top-k routed gated experts; see the module docstring for layout, routing and statistics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, E = cfg.n_embd, cfg.n_experts
        I = cfg.moe_intermediate_size or cfg.intermediate_size or 4 * cfg.n_embd  # noqa: E741
        self.n_experts, self.top_k, self.norm_topk = E, cfg.n_experts_per_token, cfg.moe_norm_topk
        self.impl = cfg.moe_impl
        self.act = F.silu if cfg.mlp == "swiglu" else functools.partial(F.gelu, approximate="tanh")
        self.router = nn.Linear(H, E, bias=False)
        # Filled by the model's init (or an import); torch.empty so that a meta build costs nothing.
        self.w_gate = nn.Parameter(torch.empty(E, I, H))
        self.w_up = nn.Parameter(torch.empty(E, I, H))
        self.w_down = nn.Parameter(torch.empty(E, H, I))
        self.dropout = nn.Dropout(cfg.dropout)
        # expert parallelism: (mlp, rows sorted by global expert, their slice ends) -> the rows' outputs,
        # each computed on the rank holding its expert (trainer.parallel.expert.shard_experts); None: all here
        self.dispatch: Callable[[SparseMLP, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        self.router_logits: torch.Tensor | None = None  # (N, E) fp32, the last forward's
        self.last_topk: torch.Tensor | None = None  # (N, k), the last forward's

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, H) -> (B, T, H)."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, H)
        logits = self.router(x)  # (N, E)
        weights, experts = route(logits, self.top_k, self.norm_topk)  # (N, k) each
        if torch._C._current_graph_task_id() == -1:  # not an activation-checkpoint recompute in backward:
            # the recompute's logits (with the graph of the recomputed block) would outlive backward
            self.router_logits, self.last_topk = logits.float(), experts.detach()
        order, ends = sort_by_expert(experts.flatten(), self.n_experts)  # (N k,), (E,)
        xs = x[order // self.top_k]  # (N k, H): each slot's token, in expert order
        y = self.experts(xs, ends) if self.dispatch is None else self.dispatch(self, xs, ends)  # (N k, H)
        y = y[order.argsort()].float() * weights.flatten()[:, None]  # (N k, H) fp32, in slot order
        y = y.view(*experts.shape, -1).sum(dim=1)  # (N, H)
        return self.dropout(y.to(x.dtype).view(shape))

    def experts(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """Rows (S, H) sorted by this rank's expert, whose slices end at `ends` (E_local,) -> (S, H)."""
        if self.impl == "loop" or (self.impl == "auto" and not grouped_mm_supported(xs)):
            return self.experts_loop(xs, ends)
        if not grouped_mm_supported(xs):
            raise ValueError(
                f"model.moe_impl=grouped needs torch._grouped_mm's fast kernel (CUDA compute capability 9.x "
                f"or 10.x, bf16), not {xs.device.type} {compute_dtype(xs)}: use model.moe_impl=auto or loop"
            )
        return self.experts_grouped(xs, ends)

    def experts_loop(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """One gate, up and down matmul per expert over its contiguous slice of xs (S, H)."""
        outs, start = [], 0
        bounds = ends.tolist()  # host sync: the bounds
        for end, (w_gate, w_up, w_down) in zip(bounds, self.per_expert(), strict=True):
            if end > start:
                h = xs[start:end]  # (S_e, H)
                h = self.act(self.expert_linear(h, w_gate)) * self.expert_linear(h, w_up)  # (S_e, I)
                outs.append(self.expert_linear(h, w_down))  # (S_e, H)
            start = end
        # No rows (a rank no token was sent to): xs[:0] keeps the graph, so backward's all-to-all runs here too.
        return torch.cat(outs) if outs else xs[:0]

    def experts_grouped(self, xs: torch.Tensor, ends: torch.Tensor) -> torch.Tensor:
        """The same in three torch._grouped_mm calls; `ends` are its offsets."""
        dtype = compute_dtype(xs)  # _grouped_mm is not under autocast: cast by hand
        w_gate, w_up, w_down = self.stacked(dtype)
        xs = xs.to(dtype)
        h = self.act(self.grouped_linear(xs, w_gate, ends)) * self.grouped_linear(xs, w_up, ends)  # (S, I)
        return self.grouped_linear(h, w_down, ends)  # (S, H)

    # The expert matmuls' seams: the weights as each path takes them, and the matmul. trainer.lora's
    # LoRAExperts overrides these four to add its adapters' low-rank terms; nothing else does.

    def per_expert(self) -> Iterator[tuple[Any, Any, Any]]:
        """Each expert's gate, up and down matrices (out, in), for expert_linear."""
        # unbind, not w[e] per expert: its backward stacks the experts' gradients into one (E, I, H)
        # tensor, where each w[e]'s would make a zero (E, I, H) tensor of its own and add them up.
        return zip(self.w_gate.unbind(0), self.w_up.unbind(0), self.w_down.unbind(0), strict=True)

    def expert_linear(self, x: torch.Tensor, weight: Any) -> torch.Tensor:
        """x (S_e, in) -> (S_e, out) through one of per_expert's matrices."""
        return F.linear(x, weight)

    def stacked(self, dtype: torch.dtype) -> tuple[Any, Any, Any]:
        """Gate, up and down as grouped_linear takes them: (E, in, out) in dtype."""
        return tuple(w.to(dtype).transpose(-2, -1) for w in (self.w_gate, self.w_up, self.w_down))

    def grouped_linear(self, x: torch.Tensor, weight: Any, ends: torch.Tensor) -> torch.Tensor:
        """x (S, in) -> (S, out), each expert's rows (ending at `ends`) through its matrix of `weight`."""
        return torch._grouped_mm(x, weight, offs=ends)

    # -----------------------------------------------------------------------------------------
    # Expert parallelism (trainer.parallel.expert installs it; nothing here knows ranks)

    def keep_experts(self, start: int, stop: int) -> None:
        """Keep experts [start, stop) only (this rank's block under expert parallelism)."""
        for name in ("w_gate", "w_up", "w_down"):
            full = getattr(self, name)
            block = full.detach()[start:stop].clone()  # (stop - start, ., .)
            setattr(self, name, nn.Parameter(block, requires_grad=full.requires_grad))
