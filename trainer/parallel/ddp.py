"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced.

With expert parallelism (parallel.expert=N > 1, trainer/parallel/expert.py) every rank holds the
whole model but 1/N of each sparse MLP's experts: DDP ignores those blocks (their gradients are
complete over the expert group already) and they are averaged over their copies here instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.config import PrecisionConfig
from trainer.model import param_group
from trainer.model.gpt import bare_name
from trainer.parallel.base import TorchStrategy, WeightSource, all_reduce_groups, group_sumsq, materialize


class DDP(TorchStrategy):
    """`parallel=ddp`. Gradients are whole and identical on every rank after backward (expert
    blocks: identical on the ranks that hold the same block)."""

    name = "ddp"
    plain_params = True

    def __init__(
        self,
        device: torch.device,
        rank: int = 0,
        world_size: int = 1,
        precision: PrecisionConfig | None = None,
        expert: int = 1,
    ) -> None:
        super().__init__(device, rank, world_size, precision)
        if expert > 1:
            from trainer.parallel.expert import ExpertParallel

            self.experts = ExpertParallel(expert, world_size, device)  # collective: the expert mesh

    def parallelize(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        # Whole first, then each rank keeps its block of experts: a random init reads each
        # parameter's shape from the model, so sharding on the meta device would draw other values.
        materialize(model, weights, self.device)  # DDP wraps real tensors: it broadcasts rank 0's
        if self.experts is not None:
            ignored = self.experts.shard(model)
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients live in DDP's all-reduce buckets: no copy in or out, one gradient-sized buffer
        # less. Not static_graph: its first iteration must all-reduce, and accumulation starts
        # with no_sync micro-batches (torch 2.13's reducer asserts).
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def unwrapped(self) -> nn.Module:
        return self.model.module

    @contextlib.contextmanager
    def sync_gradients(self, is_last: bool) -> Iterator[None]:
        # Before the accumulation boundary, accumulate locally: no all-reduce.
        with contextlib.nullcontext() if is_last else self.model.no_sync():
            yield
        if is_last and self.experts is not None:
            self.experts.reduce_gradients()  # collective: expert blocks over their copies

    # -- with expert parallelism, sums over the expert group: each rank its blocks, rank 0 the rest --
    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        if self.experts is None:
            return super().grad_sumsq_by_group()
        named = ((n, p.grad) for n, p in self.model.named_parameters() if p.grad is not None and self.experts.owns(n))
        return self.reduce_owned(group_sumsq(named), trainable_only=True)

    def owned_params(self, trainable_only: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in super().owned_params(trainable_only):
            if self.experts is None or self.experts.owns(name):
                yield name, tensor

    def reduce_owned(self, sums: dict[str, torch.Tensor], trainable_only: bool = False) -> dict[str, torch.Tensor]:
        if self.experts is None:
            return sums
        for name, p in self.model.named_parameters():  # every rank sends every group, owned or not
            if p.requires_grad or not trainable_only:
                sums.setdefault(param_group(name), torch.zeros((), device=self.device))
        return all_reduce_groups(sums, group=self.experts.group)  # collective

    def full_state_dict(self, trainable_only: bool = False) -> dict[str, torch.Tensor]:
        state = super().full_state_dict(trainable_only)
        if self.experts is not None:
            blocks = {bare_name(n): p for n, p in self.unwrapped().named_parameters() if self.experts.is_expert(n)}
            for name in state:  # the same order on every rank
                if bare_name(name) in blocks:
                    state[name] = self.experts.full(blocks[bare_name(name)].detach()).cpu()  # collective
        return state
