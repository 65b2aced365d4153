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
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trainer.config import OptimConfig, PrecisionConfig
from trainer.model import param_group
from trainer.optim import build_optimizer, build_scheduler
from trainer.precision import DynamicLossScaler, autocast


class SingleProcess:
    """One process, one device, no wrapper (`parallel=none`)."""

    name = "none"

    def __init__(
        self, device: torch.device, rank: int = 0, world_size: int = 1, precision: PrecisionConfig | None = None
    ) -> None:
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.precision = precision or PrecisionConfig()
        self.scaler = DynamicLossScaler(self.precision) if self.precision.scaled else None
        self.skipped_steps = 0  # optimizer steps skipped for inf / NaN gradients
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # -- setup -------------------------------------------------------------------------------
    def setup(self, model: nn.Module, optim_cfg: OptimConfig, max_steps: int, accum_steps: int = 1) -> None:
        """Move the model to the device, then build AdamW and its schedule over its parameters."""
        self.model = self.wrap(model)
        fused = self.device.type == "cuda" and all(p.is_cuda for p in self.model.parameters())
        self.optimizer = build_optimizer(self.model, optim_cfg, fused=fused)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, max_steps)

    def wrap(self, model: nn.Module) -> nn.Module:
        """Place the model on the device; distributed strategies also wrap or shard it here."""
        return model.to(self.device)

    def unwrapped(self) -> nn.Module:
        """The plain GPT module (for generation and export)."""
        return self.model

    # -- one optimizer step ------------------------------------------------------------------
    @contextlib.contextmanager
    def micro_step(self, is_last: bool) -> Iterator[None]:
        """Context for one micro-batch's forward and backward: gradient sync only when is_last,
        forward under the precision policy's autocast."""
        with self.sync_gradients(is_last), self.autocast():
            yield

    def sync_gradients(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Distributed strategies skip the gradient reduction unless is_last."""
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.precision, self.device)

    def backward(self, loss: torch.Tensor) -> None:
        # The loss is already divided by the *global* target count; DDP, FSDP and DeepSpeed
        # average gradients over ranks, so multiply back by the world size to get the sum.
        # Under loss scaling, also by the scale (undone by unscale_gradients).
        scale = self.scaler.scale if self.scaler is not None else 1.0
        (loss * (self.world_size * scale)).backward()

    def unscale_gradients(self) -> None:
        """Divide this rank's gradients (or shards) by the loss scale; a no-op without scaling."""
        if self.scaler is None:
            return
        grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.scaler.scale)

    def loss_scale(self) -> float | None:
        """The current loss scale (None when no scaler runs)."""
        return self.scaler.scale if self.scaler is not None else None

    def grad_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        """Sum of squared gradient entries per parameter group (embed, block.i.attn, ..., head).

        Groups partition the parameters, so the global norm is sqrt(sum of the values).
        Values stay on the device: no host sync here.
        """
        return group_sumsq((name, p.grad) for name, p in self.model.named_parameters() if p.grad is not None)

    # -- parameter statistics for monitoring (each rank's own part, reduced like the gradients) --
    def owned_params(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, the part of the fp32 weights this rank owns); every rank owns all on none / ddp."""
        for name, p in self.model.named_parameters():
            yield name, local(p.detach())

    def reduce_owned(self, sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Sum per-group values of owned parts over ranks (nothing to add when every rank owns all)."""
        return sums

    def param_sumsq_by_group(self) -> dict[str, torch.Tensor]:
        return self.reduce_owned(group_sumsq(self.owned_params()))

    def snapshot_params(self) -> list[torch.Tensor]:
        """A copy of the owned weights, to measure the next update against (monitor steps only)."""
        return [t.clone() for _, t in self.owned_params()]

    def update_sumsq_by_group(self, before: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-group sums of squares of the update just applied (weights now minus `before`)."""
        deltas = ((name, t - old) for (name, t), old in zip(self.owned_params(), before, strict=True))
        return self.reduce_owned(group_sumsq(deltas))

    def skip_step(self) -> None:
        """Drop this step's gradients: weights, optimizer state and schedule stay as they are."""
        self.optimizer.zero_grad(set_to_none=True)

    def clip_and_step(self, grad_norm: torch.Tensor, max_norm: float) -> bool:
        """Scale gradients so their global norm is at most max_norm (0: no clipping), then step.

        grad_norm is the global pre-clip norm from grad_sumsq_by_group, so a sharded strategy
        clips by the norm of the whole gradient, never by its own shard's. A non-finite norm
        (overflow, NaN) skips the step: weights, optimizer state and schedule stay as they were,
        the gradients are dropped and the loss scale backs off. Returns whether it stepped.
        """
        finite = bool(torch.isfinite(grad_norm))  # host sync: once per step, to decide whether to step
        if self.scaler is not None:
            self.scaler.update(found_non_finite=not finite)
        if not finite:
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped_steps += 1
            return False
        if max_norm > 0:
            # Same coefficient as torch.nn.utils.clip_grad_norm_; stays on device (no sync).
            coef = torch.clamp(max_norm / (grad_norm + 1e-6), max=1.0)
            grads = [local(p.grad) for p in self.model.parameters() if p.grad is not None]
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True

    # -- collectives ---------------------------------------------------------------------------
    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks (identity on one process)."""
        return value

    def barrier(self) -> None:
        """Wait for every rank (no-op on one process)."""

    def broadcast_path(self, path: Path | None) -> Path | None:
        """Rank 0's path on every rank (identity on one process)."""
        return path

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on CPU, on rank 0 (collective: every rank must call it)."""
        return {k: v.detach().cpu() for k, v in self.unwrapped().state_dict().items()}

    def save_state(self, directory: Path) -> None:
        """Model and optimizer state with torch.distributed.checkpoint (collective: each rank
        writes its own shards; the result loads at any world size)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)  # keyed by parameter name
        with _quiet_single_process():
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory), no_dist=not _dist())

    def save_state_async(self, directory: Path) -> Any:
        """Like save_state, but returns once the tensors are staged in CPU memory; the write runs
        in a background thread. Returns a future (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        with _quiet_single_process():
            return dcp.async_save(
                {"model": model_state, "optim": optim_state}, checkpoint_id=str(directory), no_dist=not _dist(),
                process_group=self.checkpoint_group(),
            )

    def checkpoint_group(self) -> Any:
        """The process group of checkpoint I/O (None: no collectives, one process)."""
        return None

    def load_state(self, directory: Path, saved_world_size: int | None = None) -> None:
        """Load what save_state wrote, resharding to this run's layout, whatever the world size
        it was saved at (collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(directory), no_dist=not _dist())  # fills the tensors in place
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def close(self) -> None:
        """Release process groups and other resources."""


class Distributed(SingleProcess):
    """What every multi-rank strategy shares: collectives over the default process group."""

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        value = value.clone()
        dist.all_reduce(value)  # collective
        return value

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()  # collective

    def broadcast_path(self, path: Path | None) -> Path | None:
        import torch.distributed as dist

        box = [str(path) if path is not None else None]
        dist.broadcast_object_list(box, src=0)  # collective
        return Path(box[0]) if box[0] is not None else None

    def checkpoint_group(self) -> Any:
        """A gloo group of all ranks for checkpoint I/O, made at the first save (collective).

        An async save's background thread runs collectives (DCP's plan and metadata exchange, the
        commit's barrier and checksum gather) while the training thread runs its own on the
        default group; two threads on one group could interleave them differently on different
        ranks. A group of its own keeps the two streams apart (DCP's advice for async_save).
        """
        import torch.distributed as dist

        if getattr(self, "_checkpoint_group", None) is None:
            self._checkpoint_group = dist.new_group(backend="gloo")
        return self._checkpoint_group

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' when there is no process group: we know."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _dist() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded tensor (a DTensor under FSDP2); a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def group_sumsq(named_grads: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-group sums of squares of (this rank's part of) each gradient, in fp32, on device."""
    sums: dict[str, torch.Tensor] = {}
    for name, grad in named_grads:
        group = param_group(name)
        sq = local(grad).detach().float().pow(2).sum()
        sums[group] = sums[group] + sq if group in sums else sq
    return sums


def all_reduce_groups(sums: dict[str, torch.Tensor], group=None) -> dict[str, torch.Tensor]:
    """Sum per-group values over ranks in ONE collective (groups in sorted order on every rank)."""
    import torch.distributed as dist

    names = sorted(sums)
    stacked = torch.stack([sums[n] for n in names])
    dist.all_reduce(stacked, group=group)  # collective: one all-reduce of len(groups) floats
    return dict(zip(names, stacked.unbind(), strict=True))


def global_norm(sums: dict[str, torch.Tensor]) -> torch.Tensor:
    """sqrt of the total sum of squares over groups (a 0-dim tensor on the groups' device)."""
    return torch.stack(list(sums.values())).sum().sqrt() if sums else torch.tensor(math.nan)
