"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel.base import TorchStrategy, WeightSource, materialize


class DDP(TorchStrategy):
    """`parallel=ddp`. Gradients are whole and identical on every rank after backward."""

    name = "ddp"

    def parallelize(self, model: nn.Module, weights: WeightSource) -> nn.Module:
        materialize(model, weights, self.device)  # DDP wraps real tensors: it broadcasts rank 0's
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        # Gradients live in DDP's all-reduce buckets: no copy in or out, one gradient-sized buffer
        # less. Not static_graph: its first iteration must all-reduce, and accumulation starts
        # with no_sync micro-batches (torch 2.13's reducer asserts).
        return DistributedDataParallel(model, device_ids=device_ids, gradient_as_bucket_view=True)

    def unwrapped(self) -> nn.Module:
        return self.model.module

    def sync_gradients(self, is_last: bool) -> contextlib.AbstractContextManager:
        # Before the accumulation boundary, accumulate locally: no all-reduce.
        return contextlib.nullcontext() if is_last else self.model.no_sync()
