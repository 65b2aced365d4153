"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced."""

from __future__ import annotations

import contextlib

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.parallel.base import Distributed


class DDP(Distributed):
    """`parallel=ddp`. Gradients are whole and identical on every rank after backward."""

    name = "ddp"

    def wrap(self, model: nn.Module) -> nn.Module:
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model.to(self.device), device_ids=device_ids)

    def unwrapped(self) -> nn.Module:
        return self.model.module

    def sync_gradients(self, is_last: bool) -> contextlib.AbstractContextManager:
        # Before the accumulation boundary, accumulate locally: no all-reduce.
        return contextlib.nullcontext() if is_last else self.model.no_sync()
