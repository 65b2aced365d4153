"""The seam between the loop and distribution: one small interface every strategy fills in.

The loop asks a strategy to wrap the model and build the optimizer, for a micro-step context
(no gradient all-reduce before the accumulation boundary), to run backward, for per-group
gradient sums of squares (reduced across ranks, shard-aware), to clip and step, and to
reduce scalars across ranks. `SingleProcess` is the reference every other strategy is
tested against; it is also the base the others override.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn

from trainer.config import OptimConfig
from trainer.model import param_group
from trainer.optim import build_optimizer, build_scheduler


class SingleProcess:
    """One process, one device, no wrapper (`parallel=none`)."""

    name = "none"

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.rank = 0
        self.world_size = 1
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int) -> None:
        """Move the model to the device, then build AdamW and its schedule over its parameters."""
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, optim_cfg, fused=self.device.type == "cuda")
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)

    def unwrapped(self) -> nn.Module:
        """The plain GPT module (for generation and export)."""
        return self.model

    # -- one optimizer step ------------------------------------------------------------------
    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        """Context for one micro-batch; distributed strategies skip gradient sync unless is_last."""
        yield

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        """Sum of squared gradient entries per parameter group (embed, block.i.attn, ..., head).

        Groups partition the parameters, so the global norm is sqrt(sum of the values).
        Values stay on the device: no host sync here.
        """
        sums: dict[str, torch.Tensor] = {}
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            group = param_group(name)
            sq = p.grad.detach().float().pow(2).sum()
            sums[group] = sums[group] + sq if group in sums else sq
        return sums

    def clip_and_step(self, grad_norm: torch.Tensor, max_norm: float) -> None:
        """Scale gradients so their global norm is at most max_norm (0: no clipping), then step.

        grad_norm is the global pre-clip norm from grad_sumsq_by_group, so a sharded strategy
        clips by the norm of the whole gradient, never by its own shard's.
        """
        if max_norm > 0:
            # Same coefficient as torch.nn.utils.clip_grad_norm_; stays on device (no sync).
            coef = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity on one process)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def close(self) -> None:
        """Release process groups and other resources."""


def global_norm(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """sqrt of the total sum of squares over groups (a 0-dim tensor on the groups' device)."""
    return torch.stack(list(sums.values())).sum().sqrt() if sums else torch.tensor(math.nan)
