"""The diagnostics a training run switches on (`diagnostics.*`), between the loop and the estimators.

    noise scale   every step: the first micro-batch's gradient (the small batch) and the whole
                  step's (the big one) -> NoiseScale's EMAs -> noise_scale/b_simple, in tokens
    sharpness     every diagnostics.sharpness.interval steps, after the step: λmax of the loss's
                  Hessian on a fixed held batch -> sharpness/lambda_max next to 2 / lr

The small batch of the noise scale is the first micro-batch of every rank: with the noise scale on,
ddp and fsdp reduce gradients after the first micro-batch as well as after the last (one more
all-reduce / reduce-scatter per step; gradients still sum to the step's, reduction being linear),
so the first micro-batch's gradient is a mean over its tokens on every rank, whatever the sharding.
Under zero1-3 DeepSpeed decides when it reduces (zero1 at the step's end, zero2 / 3 after every
micro-batch, into buffers that depend on the stage and the offload): there each rank's own first
micro-batch is a small batch, its squared gradients summed by hooks as backward makes them, and
the mean of the ranks' squared norms estimates |G|^2 + tr(Sigma) / B with B the harmonic mean of
their token counts (trainer.diagnostics.noise_scale); no extra gradient traffic.
"""

from __future__ import annotations

import contextlib
import logging
import math
from typing import Any

import numpy as np
import torch

from trainer.config import Config, ConfigError
from trainer.diagnostics.noise_scale import NoiseScale
from trainer.diagnostics.sharpness import sharpness
from trainer.model.loss import IGNORE_INDEX
from trainer.parallel.base import Strategy, local

log = logging.getLogger("trainer")


def noise_scale_sample(
    small_sq: float, small_targets: float, step_sq: float, step_targets: float
) -> tuple[float, float, float, float] | None:
    """(|g_small|^2, |g_big|^2, B_small, B_big) in tokens from one step (StepResult.noise), or None
    if it cannot count: a small batch without targets or not smaller than the step, a non-finite norm.

    small_sq: the squared norm of the small batch's mean gradient (Strategy.small_batch_sq);
    step_sq: the step's, a mean over step_targets tokens."""
    if not (0 < small_targets < step_targets) or not math.isfinite(small_sq) or not math.isfinite(step_sq):
        return None
    return small_sq, step_sq, small_targets, step_targets


class Instruments:
    """The run's instruments, built once from the config and the validation split; `metrics()` is
    merged into each logged row, `parts()` into each checkpoint."""

    def __init__(self, cfg: Config, strategy: Strategy, val_split: Any) -> None:
        self.cfg, self.strategy = cfg.diagnostics, strategy
        self.noise = NoiseScale(self.cfg.noise_scale_ema) if self.cfg.noise_scale else None
        self.held = None
        sharp = self.cfg.sharpness
        if sharp.enabled:
            if len(val_split) < sharp.batch_size:
                raise ConfigError(
                    f"diagnostics.sharpness.batch_size={sharp.batch_size} is larger than the validation split "
                    f"({len(val_split)} sequences): lower it or raise data.val_fraction"
                )
            # The fixed held batch: the validation split's first sequences, the same at every estimate.
            x, y, *positions = (t.to(strategy.device) for t in val_split.get_batch(np.arange(sharp.batch_size)))
            self.held = x, y, (positions[0] if positions else None)
        self.latest: dict[str, Any] = {}

    @property
    def probe_first_micro_batch(self) -> bool:
        return self.noise is not None

    def parts(self) -> dict[str, Any]:
        return {"noise_scale": self.noise} if self.noise is not None else {}

    def after_step(self, result: Any, step: int, lr: float, global_tokens: int) -> None:
        """Take a settled StepResult's figures; every sharpness interval, measure λmax (collective
        under fsdp: every rank runs it)."""
        if self.noise is not None and result.noise is not None:
            sample = noise_scale_sample(*result.noise)
            if sample is not None and result.stepped:
                self.latest.update(self.noise.update(*sample))
                self.latest["noise_scale/global_batch_tokens"] = global_tokens
        if self.held is not None and step % self.cfg.sharpness.interval == 0:
            value, method = self.sharpness()
            if self.method is None:  # named once; an auto fallback is kept, not tried again each time
                log.info(f"sharpness: λmax by {method.replace('_', ' ')}, every {self.cfg.sharpness.interval} steps")
                self.method = method
            self.measured = {
                "sharpness/lambda_max": value, "sharpness/two_over_lr": 2.0 / lr if lr > 0 else math.inf,
            }  # fmt: skip
            self.sharpness_step = step

    sharpness_step = -1  # the step of the newest estimate (the loop logs that step)
    method: str | None = None  # the sharpness method in use, once the first estimate has run
    measured: dict[str, float] = {}  # the newest sharpness figures

    def metrics(self, step: int) -> dict[str, Any]:
        """The noise scale's current EMAs; the sharpness only in the row of the step it was measured at."""
        return {**self.latest, **(self.measured if step == self.sharpness_step else {})}

    def sharpness(self) -> tuple[float, str]:
        """λmax on the held batch, in eval mode (no dropout) under the run's precision."""
        strategy, sharp = self.strategy, self.cfg.sharpness
        x, y, positions = self.held
        sharded = strategy.name == "fsdp"
        model = strategy.model if sharded else strategy.unwrapped()  # fsdp: forward gathers the shards
        params = [p for p in strategy.unwrapped().parameters() if p.requires_grad]
        count = float((y != IGNORE_INDEX).sum())
        extra = {} if positions is None else {"positions": positions}

        def loss_fn() -> torch.Tensor:
            with strategy.autocast():
                return model(x, targets=y, **extra) / count  # mean token loss of the held batch

        grad_fn = dot = None
        method = self.method or sharp.method
        if sharded:  # the gradient through FSDP's hooks: backward(), then each rank's shard of .grad
            method = "finite_difference"

            def grad_fn() -> list[torch.Tensor]:
                for p in params:
                    p.grad = None
                with contextlib.ExitStack() as stack:
                    stack.enter_context(strategy.sync_gradients(True))
                    loss_fn().backward()  # collective: every rank the same batch, so the average is its gradient
                grads = [local(p.grad).clone() for p in params]
                for p in params:
                    p.grad = None
                return grads

            def dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
                mine = sum((u.double() * v.double()).sum() for u, v in zip(a, b, strict=True))
                return strategy.reduce_owned({"dot": mine})["dot"]  # collective: over the shards

        locals_ = [local(p) for p in params] if sharded else params
        was_training = model.training
        model.eval()
        try:
            return sharpness(loss_fn, locals_, sharp.iterations, method, grad_fn=grad_fn, dot=dot)
        finally:
            model.train(was_training)
