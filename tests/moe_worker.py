"""Run under torchrun by tests/test_moe.py: expert parallelism on real ranks against one process.

    torchrun --nproc_per_node 2 tests/moe_worker.py OUT_DIR

Every rank builds the same SparseMLP (one seed) and the same global batch X (R, B, T, H) with its
upstream gradient G, runs the single-process module on all of X (the R ranks' batches one after
another) and an expert-sharded copy on its own X[r], and writes OUT_DIR/rank{r}.json: per case the
largest differences, relative to the reference's scale (output, input gradient, router gradient
summed over ranks, each expert shard's gradient against the same rows of the single-process one),
how many token slots the rank's experts got, and the refusal's line.
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from trainer.config import ModelConfig
from trainer.model.moe import SparseMLP
from trainer.parallel.dist import exit_process
from trainer.parallel.expert import shard_experts

CASES = {  # name: (ModelConfig overrides, route every token to the first half of the experts)
    "top2": ({}, False),
    "top1-geglu": ({"n_experts_per_token": 1, "mlp": "geglu", "moe_norm_topk": False}, False),
    "top3-4-experts": ({"n_experts": 4, "n_experts_per_token": 3}, False),
    "rank-1-idle": ({}, True),  # rank 1 owns experts no token picks: it receives no rows at all
}


def config(**overrides) -> ModelConfig:
    fields = dict(n_embd=16, n_head=2, n_experts=8, n_experts_per_token=2, moe_intermediate_size=24, mlp="swiglu")
    return ModelConfig(**{**fields, "bias": False, "moe_impl": "loop", **overrides})


def relative_difference(a: torch.Tensor | None, b: torch.Tensor) -> float:
    """max |a - b| / max(1, max |b|): absolute for values up to 1, relative above (gradients here
    reach ~16, where one fp32 rounding is ~1e-6). A missing gradient (of a parameter no token
    used) counts as zeros. tests/test_moe.py compares with it too."""
    return ((b if a is None else a - b).abs().max() / b.abs().max().clamp(min=1.0)).item()


def case(overrides: dict, idle: bool) -> dict:
    rank, ranks = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same module and batch on every rank
    cfg = config(**overrides)
    one = SparseMLP(cfg)
    for p in one.parameters():
        torch.nn.init.normal_(p, 0.0, 0.25)
    X = torch.randn(ranks, 3, 5, cfg.n_embd)  # (R, B, T, H)
    if idle:  # x > 0 and the second half's router rows < 0: those experts' logits are far below
        X = X.abs()
        with torch.no_grad():
            one.router.weight[cfg.n_experts // 2 :] = -1.0
            one.router.weight[: cfg.n_experts // 2].abs_()
    G = torch.randn_like(X)  # the upstream gradient of each output

    sharded = copy.deepcopy(one)
    shard_experts(sharded, dist.group.WORLD)

    X_one = X.clone().requires_grad_()
    Y = one(X_one.flatten(0, 1))  # (R B, T, H): the ranks' batches one after another
    (Y * G.flatten(0, 1)).sum().backward()

    x = X[rank].clone().requires_grad_()
    y = sharded(x)
    (y * G[rank]).sum().backward()
    router_grad = sharded.router.weight.grad.clone()
    dist.all_reduce(router_grad)  # collective: the replicated router's per-rank parts add up, as DDP's would

    n_local = cfg.n_experts // ranks
    mine = slice(rank * n_local, (rank + 1) * n_local)
    result = {
        "y": relative_difference(y, Y.view_as(X)[rank]),
        "x_grad": relative_difference(x.grad, X_one.grad[rank]),
        "router_grad": relative_difference(router_grad, one.router.weight.grad),
        "local_slots": int(((one.last_topk >= mine.start) & (one.last_topk < mine.stop)).sum()),
    }
    for name in ("w_gate", "w_up", "w_down"):
        assert getattr(sharded, name).shape[0] == n_local
        result[name] = relative_difference(getattr(sharded, name).grad, getattr(one, name).grad[mine])
    return result


def refusal() -> str:
    """shard_experts' line for 3 experts over this group."""
    try:
        shard_experts(SparseMLP(config(n_experts=3)), dist.group.WORLD)
    except ValueError as error:
        return str(error)
    return ""


if __name__ == "__main__":
    dist.init_process_group("gloo")
    results = {name: case(*spec) for name, spec in CASES.items()}
    results["refusal"] = refusal()
    Path(sys.argv[1], f"rank{dist.get_rank()}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    exit_process(0)  # no interpreter teardown under gloo's live threads
