"""One optimizer step, the only copy of it: the loop, the tests and the benchmarks all call
`train_step`.

    micro-batches (forward, backward; no gradient all-reduce until the last) -> unscale
    -> per-group gradient sums of squares -> global norm -> spike check -> [snapshot]
    -> clip and step (or skip) -> [per-group parameter and update statistics]

The loss of a step is the sum of token losses over the whole global batch divided by the
number of target tokens in it, so accumulation over micro-batches (and ranks) with unequal
token counts gives exactly the gradient of one big batch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from trainer.model.loss import IGNORE_INDEX
from trainer.monitor import SpikeWatch
from trainer.parallel.base import Strategy, global_norm

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

    @property
    def spiked(self) -> bool:
        return bool(self.spike.get("spike/loss") or self.spike.get("spike/grad_norm"))


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
    strategy: Strategy, x: torch.Tensor, y: torch.Tensor, accum_steps: int, positions: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's batch in accum_steps micro-batches.

    positions (optional, (B, T) like x): each token's position in its own example, 0 where one
    starts; the model then keeps attention inside each example of a packed row.

    Each micro-batch's summed token loss is divided by the number of target tokens in the
    whole global batch (every micro-batch, every rank), so the accumulated gradient equals
    the gradient of the mean token loss over the global batch, whatever each micro-batch's
    token count. Returns (this rank's summed token loss, global target count), on device.
    """
    n_targets = strategy.all_reduce_sum((y != IGNORE_INDEX).sum().to(torch.float32))  # collective
    loss_sum = torch.zeros((), device=x.device)
    pieces = [x.chunk(accum_steps), y.chunk(accum_steps)]
    pieces.append(positions.chunk(accum_steps) if positions is not None else [None] * len(pieces[0]))
    for i, (xb, yb, pb) in enumerate(zip(*pieces, strict=True)):
        with strategy.micro_step(is_last=i == accum_steps - 1):
            extra = {} if pb is None else {"positions": pb}
            token_loss = strategy.model(xb, targets=yb, **extra)  # summed over this micro-batch's targets
            strategy.backward(token_loss / n_targets)
        loss_sum += token_loss.detach()
    return loss_sum, n_targets


def train_step(
    strategy: Strategy,
    x: torch.Tensor,
    y: torch.Tensor,
    accum_steps: int,
    clip_grad_norm: float,
    *,
    spikes: SpikeWatch | None = None,
    spike_action: str = "log",
    stats: bool = False,
    positions: torch.Tensor | None = None,
) -> StepResult:
    """One optimizer step on this rank's share (x, y) of the global batch (collective).

    spikes: checked with the step's loss and norm; under spike_action skip / rollback a spike
    drops the update. stats: also per-group parameter sums of squares after the step and of
    the update it made (copies the owned weights first: monitor steps only). positions: see
    forward_backward (packed examples with document masking).
    """
    clock = _Clock()
    loss_sum, n_targets = forward_backward(strategy, x, y, accum_steps, positions)
    clock.lap("forward_backward")
    strategy.unscale_gradients()
    grad_sumsq = strategy.grad_sumsq_by_group()  # reduced across ranks by the strategy
    grad_norm = global_norm(grad_sumsq)
    step_loss = strategy.all_reduce_sum(loss_sum) / n_targets  # collective
    summary = torch.stack([step_loss, grad_norm.to(step_loss), n_targets.to(step_loss)])
    loss, norm, targets = summary.tolist()  # host sync: once per step
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
    )  # fmt: skip
    if stats:
        result.param_sumsq = strategy.param_sumsq_by_group()
        if before is not None and stepped:
            result.update_sumsq = strategy.update_sumsq_by_group(before)
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
