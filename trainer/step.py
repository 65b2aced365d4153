"""One optimizer step, the only copy of it: the loop, the tests and the benchmarks all call
`train_step`.

    micro-batches (forward, backward; no gradient all-reduce until the last) -> unscale
    -> per-group gradient sums of squares -> global norm -> spike check -> [snapshot]
    -> clip and step (or skip) -> [per-group parameter and update statistics]

A deferred step (`defer=True`, where the strategy can step without the host: a fused AdamW
that reads the non-finite flag on the device, and no loss scaler) has no host sync at all: its
loss, norm, target count and whether it stepped are copied back in the background and read
later by `settle` (the loop does so at its next log step). A non-finite deferred step leaves
weights and optimizer state as they were, as a synchronous one does, but still advances the
learning-rate schedule; spike checks of deferred steps run when they are settled.

The loss of a step is the sum of token losses over the whole global batch divided by the
number of target tokens in it, so accumulation over micro-batches (and ranks) with unequal
token counts gives exactly the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from trainer.model.loss import IGNORE_INDEX
from trainer.monitor import SpikeWatch
from trainer.objectives.base import split_batch
from trainer.parallel.base import Strategy, global_norm

if TYPE_CHECKING:
    from trainer.moe_monitor import ExpertLoad, ExpertWatch
    from trainer.objectives.base import Batch, Objective

Sums = dict[str, torch.Tensor]  # parameter group -> sum of squares (0-dim, on device, reduced over ranks)


@dataclass
class StepResult:
    """What one step did. Floats are on the host; per-group sums stay on the device."""

    loss: float  # mean token loss over the global batch
    grad_norm: float  # global norm of the gradient before clipping
    target_tokens: int  # tokens that counted toward the loss, over the global batch
    lr: float  # the learning rate this step used (or would have used)
    stepped: bool  # the optimizer stepped
    non_finite: bool = False  # skipped for inf / NaN gradients
    spike: dict[str, Any] = field(default_factory=dict)  # spike/* fields, when a SpikeWatch ran
    grad_sumsq: Sums = field(default_factory=dict)  # per group: every step
    param_sumsq: Sums = field(default_factory=dict)  # per group, after the step: stats=True only
    update_sumsq: Sums = field(default_factory=dict)  # per group, of the update: stats=True and stepped
    # Seconds per piece (host clock): forward_backward, grad_stats, clip_and_step; on monitor
    # steps also snapshot and param_stats.
    timings: dict[str, float] = field(default_factory=dict)

    readback: ReadBack | None = None  # a deferred step's figures, until `settle` reads them
    # diagnostics.noise_scale: (|mean gradient of the small batch|^2, its size in target tokens,
    # |step gradient|^2, the step's target tokens) (see Strategy.small_batch_sq)
    noise: tuple[float, float, float, float] | None = None
    expert_load: ExpertLoad | None = None  # a mixture of experts' routing over the step, on device (moe_monitor)
    objective: dict[str, float] = field(default_factory=dict)  # a dpo / grpo step's own figures (rewards, kl, ...)

    @property
    def spiked(self) -> bool:
        return bool(self.spike.get("spike/loss") or self.spike.get("spike/grad_norm"))

    def settle(self, spikes: SpikeWatch | None = None) -> StepResult:
        """Read a deferred step's figures (waits for the device only if it has not got there yet)
        and run its spike check; a step already settled is returned as it is."""
        if self.readback is None:
            return self
        loss, norm, targets, finite = self.readback.values()  # waits on an event: no stream sync
        self.readback = None
        self.loss, self.grad_norm, self.target_tokens = loss, norm, int(targets)
        self.stepped, self.non_finite = bool(finite), not finite
        if not self.stepped:
            self.update_sumsq = {}
        if spikes is not None:
            _, self.spike = spikes.check(loss, norm)
        return self


class ReadBack:
    """A few device scalars copied to the host without blocking: into pinned memory behind a CUDA
    event on a GPU (the host waits only when it reads, and only until the copy is done); on the
    CPU the values are simply there."""

    def __init__(self, values: torch.Tensor) -> None:
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def values(self) -> list[float]:
        if self.event is not None:
            self.event.synchronize()  # the copy (and everything before it on the stream) is done
        return self.host.tolist()


class _Clock:
    """Host-side seconds of consecutive pieces (no device sync: on a GPU, launch time unless a
    host sync ends the piece)."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self.last
        self.last = now


def forward_backward(
    strategy: Strategy,
    x: torch.Tensor,
    y: torch.Tensor,
    accum_steps: int,
    positions: torch.Tensor | None = None,
    all_targets: bool = False,
    probe: list[torch.Tensor] | None = None,
    load: ExpertLoad | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's batch in accum_steps micro-batches.

    positions (optional, (B, T) like x): each token's position in its own example, 0 where one
    starts; the model then keeps attention inside each example of a packed row.

    Each micro-batch's summed token loss is divided by the number of target tokens in the
    whole global batch (every micro-batch, every rank), so the accumulated gradient equals
    the gradient of the mean token loss over the global batch, whatever each micro-batch's
    token count. Returns (this rank's summed token loss, global target count), on device.
    all_targets: the caller knows no target is IGNORE_INDEX (windows of a token stream), so the
    count is every rank's equal share of the global batch: no collective before the forward.
    probe (the noise scale's small batch): the first micro-batch's mean gradient's squared norm and
    its target count (Strategy.small_batch_sq) are appended to the list (device tensors).
    load: each micro-batch's expert routing is added to it (on the device).
    """
    if all_targets:
        n_targets = torch.full((), float(y.numel() * strategy.dp_size), device=y.device)  # a fill: no copy
    else:
        n_targets = strategy.all_reduce_sum((y != IGNORE_INDEX).sum().to(torch.float32), "target count")  # collective
    loss_sum = torch.zeros((), device=x.device)
    pieces = [x.chunk(accum_steps), y.chunk(accum_steps)]
    pieces.append(positions.chunk(accum_steps) if positions is not None else [None] * len(pieces[0]))
    for i, (xb, yb, pb) in enumerate(zip(*pieces, strict=True)):
        probing = probe is not None and i == 0
        with strategy.micro_step(is_last=i == accum_steps - 1, reduce=probing):
            extra = {} if pb is None else {"positions": pb}
            token_loss = strategy.model(xb, targets=yb, **extra)  # summed over this micro-batch's targets
            strategy.backward(token_loss / n_targets)
        loss_sum += token_loss.detach()
        if load is not None:
            load.add()
        if probing:
            probe += strategy.small_batch_sq((yb != IGNORE_INDEX).sum(), n_targets)  # collective
    return loss_sum, n_targets


def objective_forward_backward(
    strategy: Strategy, objective: Objective, batch: Batch, accum_steps: int
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """forward_backward for a dpo / grpo / rloo objective (trainer/objectives/): each micro-batch's loss
    numerator is divided by the objective's count over the whole global batch (pairs, sequences or
    completion tokens: one collective before the first forward), so accumulation and ranks change
    nothing. Returns (this rank's summed numerators, the global count, this rank's metric sums)."""
    count = strategy.all_reduce_sum(objective.count(batch).to(torch.float32), "objective count")  # collective
    loss_sum = torch.zeros((), device=count.device)
    sums: dict[str, torch.Tensor] = {}
    for i, piece in enumerate(split_batch(batch, accum_steps)):
        with strategy.micro_step(is_last=i == accum_steps - 1):
            numerator, parts = objective.loss(strategy, piece)
            strategy.backward(numerator / count)
        loss_sum += numerator.detach()
        for name, value in parts.items():
            sums[name] = sums.get(name, 0) + value.detach()
    return loss_sum, count, sums


def objective_summary(
    strategy: Strategy,
    loss_sum: torch.Tensor,
    targets: torch.Tensor,
    count: torch.Tensor,
    sums: Sums,
    grad_norm: torch.Tensor,
) -> torch.Tensor:
    """An objective step's figures for the host: loss, norm, targets, count, then its metric sums (the
    loss sum, the target count and the metric sums reduced in one collective)."""
    reduced = strategy.all_reduce_sum(torch.stack([loss_sum, targets, *sums.values()]), "loss and metric sums")
    step_loss = reduced[0] / count
    return torch.cat([torch.stack([step_loss, grad_norm.to(step_loss), reduced[1], count]), reduced[2:]])


def train_step(
    strategy: Strategy,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    accum_steps: int,
    clip_grad_norm: float,
    *,
    spikes: SpikeWatch | None = None,
    spike_action: str = "log",
    stats: bool = False,
    positions: torch.Tensor | None = None,
    defer: bool = False,
    all_targets: bool = False,
    noise_probe: bool = False,
    experts: ExpertWatch | None = None,
    objective: Objective | None = None,
    batch: Batch | None = None,
) -> StepResult:
    """One optimizer step on this rank's share (x, y) of the global batch (collective).

    spikes: checked with the step's loss and norm; under spike_action skip / rollback a spike
    drops the update. stats: also per-group parameter sums of squares after the step and of
    the update it made (copies the owned weights first: monitor steps only). positions: see
    forward_backward (packed examples with document masking). defer: no host sync, the figures
    are read by `StepResult.settle` (only where `strategy.steps_without_sync`, spikes only logged).
    all_targets: no target is masked (see forward_backward). noise_probe: also measure the first
    micro-batch's gradient (the noise scale's small batch; StepResult.noise; not with defer).
    experts: a mixture of experts' sparse blocks: their routing over the step, StepResult.expert_load.
    objective (with batch, its named tensors; x and y unused): a dpo / grpo / rloo step; its figures
    land in StepResult.objective, its loss is the objective's (not deferrable).
    """
    clock = _Clock()
    probe: list[torch.Tensor] | None = [] if noise_probe else None
    load = experts.start() if experts is not None else None
    sums: dict[str, torch.Tensor] = {}
    if objective is not None:
        loss_sum, count, sums = objective_forward_backward(strategy, objective, batch, accum_steps)
        targets = sums.pop("target_tokens")
    else:
        loss_sum, count = forward_backward(strategy, x, y, accum_steps, positions, all_targets, probe, load)
    clock.lap("forward_backward")
    strategy.unscale_gradients()
    grad_sumsq = strategy.grad_sumsq_by_group()  # reduced across ranks by the strategy
    grad_norm = global_norm(grad_sumsq)
    if objective is not None:
        summary = objective_summary(strategy, loss_sum, targets, count, sums, grad_norm)
    else:
        step_loss, n_targets = strategy.all_reduce_sum(loss_sum, "loss sum") / count, count  # collective
        summary = torch.stack([step_loss, grad_norm.to(step_loss), n_targets.to(step_loss), *(probe or [])])
    if defer:
        result = deferred_step(strategy, summary, grad_sumsq, clip_grad_norm, stats, clock)
        result.expert_load = load
        return result
    loss, norm, targets, *first = summary.tolist()  # host sync: once per step
    figures = {}
    if objective is not None:
        figures = objective.metrics(dict(zip(sums, first[1:], strict=True)), first[0])
        first = []
    clock.lap("grad_stats")
    spiked, spike = spikes.check(loss, norm) if spikes is not None else (False, {})
    drop = spiked and spike_action != "log"
    before = None
    if stats and not drop:
        before = strategy.snapshot_params()
        clock.lap("snapshot")
    lr = strategy.lr()
    if drop:  # a spike under skip / rollback: weights, optimizer state and schedule stay
        strategy.skip_step()
        stepped = False
    else:
        stepped = strategy.clip_and_step(grad_norm, clip_grad_norm)
    clock.lap("clip_and_step")
    result = StepResult(
        loss=loss, grad_norm=norm, target_tokens=int(targets), lr=lr, stepped=stepped,
        non_finite=not drop and not stepped, spike=spike, grad_sumsq=grad_sumsq,
        noise=(first[0], first[1], norm**2, targets) if first else None, expert_load=load, objective=figures,
    )  # fmt: skip
    if stats:
        result.param_sumsq = strategy.param_sumsq_by_group()
        if before is not None and stepped:
            result.update_sumsq = strategy.update_sumsq_by_group(before)
        clock.lap("param_stats")
    result.timings = clock.laps
    return result


def deferred_step(
    strategy: Strategy, summary: torch.Tensor, grad_sumsq: Sums, clip_grad_norm: float, stats: bool, clock: _Clock
) -> StepResult:
    """train_step's end without a host sync: clip and step with the non-finite check on the device."""
    if not strategy.steps_without_sync:
        raise RuntimeError(f"parallel={strategy.name} with these settings cannot step without a host sync")
    clock.lap("grad_stats")
    before = strategy.snapshot_params() if stats else None
    lr = strategy.lr()
    found_inf = strategy.clip_and_step_on_device(summary[1], clip_grad_norm)
    summary = torch.cat([summary, 1 - found_inf.to(summary.dtype)[None]])  # loss, norm, targets, stepped
    clock.lap("clip_and_step")
    result = StepResult(
        loss=math.nan, grad_norm=math.nan, target_tokens=0, lr=lr, stepped=False, grad_sumsq=grad_sumsq,
        readback=ReadBack(summary),
    )  # fmt: skip
    if stats:
        result.param_sumsq = strategy.param_sumsq_by_group()
        result.update_sumsq = strategy.update_sumsq_by_group(before)  # dropped by settle if it did not step
        clock.lap("param_stats")
    result.timings = clock.laps
    return result


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, split: Any, batch_size: int, batches: int, device: torch.device, autocast: Any = None
) -> float:
    """Mean token loss over the first `batches` validation batches (a fixed, deterministic set), under
    `autocast` (the strategy's precision context: training's numerics, and a bf16 frozen base runs)."""
    model.eval()
    total = torch.zeros((), device=device)
    count = 0
    n = min(len(split), batch_size * batches)
    for start in range(0, n, batch_size):
        x, y, *positions = (t.to(device) for t in split.get_batch(np.arange(start, min(start + batch_size, n))))
        with autocast if autocast is not None else contextlib.nullcontext():
            total += model(x, targets=y, **({"positions": positions[0]} if positions else {}))
        count += int((y != IGNORE_INDEX).sum())
    model.train()
    return total.item() / max(count, 1)  # host sync: once per evaluation
