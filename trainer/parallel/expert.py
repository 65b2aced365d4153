"""Expert parallelism (`parallel.expert=N`): each rank of a group of N consecutive ranks holds 1/N of
every sparse MLP's experts, and tokens travel to their expert's rank and back by all-to-all
(`shard_experts` below). Everything else stays data-parallel over all W ranks.

The W ranks form a (W/N, N) mesh, dims ("replicate", "expert"): a row is an expert group (its N
ranks split the experts: rank r of the row keeps experts [r E/N, (r + 1) E/N)); a column holds the
same block of experts W/N times, one copy per expert group.

Gradients. The loop divides each rank's summed token loss by the global target count and the
strategy's backward multiplies it by W, so that DDP's average over W ranks is the sum over them.
An expert block's gradient reaches its owner from the N ranks of its group (the all-to-all's
backward), each of those parts already times W: the owner holds W x (its group's share of the
gradient). A hook divides what arrives by N, leaving (W/N) x the group's share; the average over
the block's W/N copies (the replicate group: DDP's kind of average, over the copies only) is then
the sum over every group, the gradient of the whole global batch, as one process has it. Dividing
as gradients arrive, not when they are reduced, keeps the reduction an average: one taken early
(the noise scale's first micro-batch) composes with the last, as DDP's own all-reduce does.

Checkpoints. torch.distributed.checkpoint keeps one rank's copy of a plain tensor under its name,
so the expert blocks go to it as DTensors on the mesh (Replicate over copies, Shard(0) over the
group): every block is written once, under the whole tensor's name and shape. A checkpoint then
holds whole experts, loads at any expert degree or none (DCP reshards), and trainer.export reads it
as it reads any other.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from trainer.model.gpt import bare_name
from trainer.model.moe import SparseMLP, sort_by_expert
from trainer.parallel.dist import collective

EXPERT_WEIGHTS = ("w_gate", "w_up", "w_down")  # a SparseMLP's (E, ., .) tensors; its router stays whole
PLACEMENTS = (Replicate(), Shard(0))  # an expert block on the ("replicate", "expert") mesh


class ExpertParallel:
    """One run's expert mesh, and what expert parallelism changes for a data-parallel strategy:
    which parameters are expert blocks, how their gradients are reduced, how they are gathered."""

    def __init__(self, degree: int, world_size: int, device: torch.device) -> None:
        self.degree = degree
        self.mesh = init_device_mesh(  # collective: makes both dims' groups
            device.type, (world_size // degree, degree), mesh_dim_names=("replicate", "expert")
        )
        self.group = self.mesh["expert"].get_group()  # the N consecutive ranks that split the experts
        self.replicas = self.mesh["replicate"].get_group()  # the W/N ranks that hold this rank's block
        self.first_of_group = self.mesh.get_local_rank("expert") == 0
        self.full_shapes: dict[str, list[int]] = {}  # bare name -> whole shape, for each expert tensor
        self.params: list[nn.Parameter] = []  # this rank's expert blocks, after shard

    def shard(self, model: nn.Module) -> list[str]:
        """Keep this rank's block of every sparse MLP's experts (the model holds real tensors); returns
        their names as `model` names them (for DDP's parameters to ignore)."""
        names = []
        for module_name, module in model.named_modules():
            if not isinstance(module, SparseMLP):
                continue
            for weight in EXPERT_WEIGHTS:
                self.full_shapes[bare_name(f"{module_name}.{weight}")] = list(getattr(module, weight).shape)
            shard_experts(module, self.group)
            for weight in EXPERT_WEIGHTS:
                param = getattr(module, weight)
                param.register_hook(self._arrived)  # see the module docstring: / N as gradients arrive
                self.params.append(param)
                names.append(f"{module_name}.{weight}")
        return names

    def _arrived(self, grad: torch.Tensor) -> torch.Tensor:
        return grad / self.degree

    def is_expert(self, name: str) -> bool:
        return bare_name(name) in self.full_shapes

    def owns(self, name: str) -> bool:
        """Whether this rank counts parameter `name` in sums over the expert group: its own expert
        blocks, and the replicated rest on the group's first rank only (so each counts once)."""
        return self.is_expert(name) or self.first_of_group

    def reduce_gradients(self) -> None:
        """Average each expert block's gradient over its copies (collective over the replicate group).
        A block no token reached this step has no gradient: it gets zeros, as the same experts get
        from one process's (E, ., .) tensor, so the optimizer steps it alike (moments, weight decay)."""
        grads = []
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)
            grads.append(param.grad)
        copies = self.replicas.size()
        if copies == 1 or not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        with collective("all_reduce (expert gradients over their copies)"):
            dist.all_reduce(flat, group=self.replicas)  # collective
        flat /= copies
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))

    def full(self, block: torch.Tensor) -> torch.Tensor:
        """The whole expert tensor from every rank's block (collective over the expert group)."""
        return DTensor.from_local(block, self.mesh, PLACEMENTS).full_tensor()

    # -- checkpoints: expert blocks as DTensors for torch.distributed.checkpoint ----------------------
    def to_dtensors(self, state: dict[str, Any]) -> dict[str, Any]:
        """{"model": ..., "optim": ...} of get_state_dict with each expert tensor (the weights and the
        optimizer's moments; not the 0-dim step) a DTensor over this rank's block, sharing its storage.
        New dicts: the optimizer's own state dicts are left as they are."""
        return _convert(self, state, lambda t: DTensor.from_local(t, self.mesh, PLACEMENTS))

    def to_local(self, state: dict[str, Any]) -> dict[str, Any]:
        """to_dtensors' result with this rank's blocks again (for set_state_dict)."""
        return _convert(self, state, lambda t: t.to_local())


def _convert(experts: ExpertParallel, state: dict[str, Any], convert) -> dict[str, Any]:
    """A copy of state {"model": {name: tensor}, "optim": {"state": {name: {key: value}}, ...}} with
    `convert` applied to each expert tensor of more than 0 dims."""

    def tensors(name: str, values: dict[str, Any]) -> dict[str, Any]:
        if not experts.is_expert(name):
            return values
        return {k: convert(v) if isinstance(v, torch.Tensor) and v.dim() > 0 else v for k, v in values.items()}

    model = {name: convert(t) if experts.is_expert(name) else t for name, t in state["model"].items()}
    optim = dict(state["optim"])
    optim["state"] = {name: tensors(name, values) for name, values in optim.get("state", {}).items()}
    return {**state, "model": model, "optim": optim}


# ---------------------------------------------------------------------------------------------
# Tokens to their experts' ranks and back


def shard_experts(mlp: SparseMLP, group: dist.ProcessGroup) -> None:
    """Keep only this rank's contiguous block of `mlp`'s experts, [r E/N, (r + 1) E/N) for rank r of
    the group's N; its forward then exchanges tokens within the group. The router stays whole."""
    size, rank = group.size(), group.rank()
    if mlp.n_experts % size:
        raise ValueError(f"expert parallelism: {mlp.n_experts} experts do not split evenly over {size} ranks")
    n_local = mlp.n_experts // size
    mlp.keep_experts(rank * n_local, (rank + 1) * n_local)
    mlp.dispatch = functools.partial(exchange, group=group)


def exchange(mlp: SparseMLP, xs: torch.Tensor, ends: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """SparseMLP.experts for rows (S, H) sorted by global expert, whose slices end at `ends` (E,),
    each row computed on the rank that owns its expert."""
    n_local, ranks = mlp.w_gate.shape[0], group.size()
    counts = torch.diff(ends.long(), prepend=ends.new_zeros(1, dtype=torch.long))  # (E,) rows per expert
    received_counts = torch.empty_like(counts)  # (ranks * E/N,): from each rank, rows per expert of mine
    dist.all_to_all_single(received_counts, counts, group=group)  # collective
    send = counts.view(ranks, n_local).sum(1).tolist()  # host sync: the split sizes
    receive = received_counts.view(ranks, n_local).sum(1).tolist()
    # Sorted by expert is sorted by owning rank: contiguous blocks go out, and arrive grouped by
    # source rank, then by my expert. Sort them by my expert alone for the local compute.
    received = AllToAll.apply(xs, receive, send, group)  # (M, H)
    local_ids = torch.arange(n_local, device=xs.device).repeat(ranks)  # (ranks * E/N,)
    local_ids = local_ids.repeat_interleave(received_counts, output_size=sum(receive))  # (M,)
    local_order, local_ends = sort_by_expert(local_ids, n_local)  # (M,), (E/N,)
    ys = mlp.experts(received[local_order], local_ends)[local_order.argsort()]  # (M, H), as received
    return AllToAll.apply(ys, send, receive, group)  # (S, H), back in the sender's order


class AllToAll(torch.autograd.Function):
    """all_to_all_single of rows with given splits; backward sends the gradients back the same way
    (torch.distributed's own collective has no autograd)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)  # collective
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None
