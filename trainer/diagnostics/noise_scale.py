"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", appendix A.1), from the squared norms of two gradients of one step.

G is the true (full-data) gradient and Sigma the covariance of one example's gradient. The mean
gradient of B i.i.d. examples has E|g_B|^2 = |G|^2 + tr(Sigma) / B, so two batch sizes give two
equations and two unbiased estimators (`two_batch_estimates`). Only the marginal law of each mean
enters the expectation, so the estimators stay unbiased when the small batch is part of the big
one (the first micro-batch of an accumulated step and the whole step): nesting correlates the two
norms, which changes the variance, not the mean. Their ratio is biased; `NoiseScale` smooths each
estimator with an EMA and takes the ratio of the EMAs, as the paper does.

In the loop (trainer/step.py divides every micro-batch's summed token loss by the step's target
count N): the small batch is any part of the step, e.g. the first micro-batch, with n target tokens.
Its .grad right after its backward is (n / N) g_small, so small_sq = (N / n)^2 |.grad|^2 (and / scale^2
under a loss scaler), b_small = n; big_sq = the step's unscaled, pre-clip grad norm squared, b_big = N.
If each rank keeps its own first micro-batch (no gradient sync yet), the mean over ranks of their
small_sq has mean |G|^2 + tr(Sigma) mean(1 / n_r): pass it with b_small = 1 / mean(1 / n_r).

"Examples" are whatever unit the batch sizes count (the loop passes target tokens, so B_simple is
in tokens); the unit must be the one the gradient is a mean over. Batches drawn without
replacement from a finite set of N examples are not i.i.d.: there the trace estimate has mean
tr(Sigma) N / (N - 1) and the |G|^2 estimate |G|^2 - tr(Sigma) / (N - 1), which is negligible for
a training set but not for a toy one.
"""

from __future__ import annotations

import math


def two_batch_estimates(small_sq: float, big_sq: float, b_small: float, b_big: float) -> tuple[float, float]:
    """Unbiased estimates (|G|^2, tr(Sigma)) from |g_small|^2 and |g_big|^2, the squared norms of the
    mean gradients over b_small and b_big examples (b_small < b_big; the small batch may lie inside the big).
    Elementwise on tensors of norms too.

    |G|^2 ~ (b_big |g_big|^2 - b_small |g_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|g_small|^2 - |g_big|^2) / (1 / b_small - 1 / b_big)
    """
    if not 0 < b_small < b_big:
        raise ValueError(
            f"noise scale needs 0 < b_small < b_big, got b_small={b_small}, b_big={b_big}: the small batch "
            "must be a strict part of the big one (e.g. one micro-batch of a step with accum_steps >= 2)"
        )
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace_sigma = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    return grad_sq, trace_sigma


class NoiseScale:
    """EMAs of the two unbiased estimators and their ratio B_simple. Stateful: its state is plain
    Python numbers, so a resumed run continues bitwise.

    The EMAs are bias-corrected as Adam's moments are (divided by 1 - ema^t after t updates), so the
    first values are not pulled toward 0; B_simple is the ratio of the EMAs, in which the correction
    cancels. Steps with a non-finite norm (a skipped fp16 overflow) leave the EMAs as they were.
    """

    def __init__(self, ema: float = 0.95) -> None:
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"noise scale ema={ema} must be in [0, 1)")
        self.ema = ema
        self.grad_sq, self.trace_sigma, self.count = 0.0, 0.0, 0  # raw (uncorrected) EMAs, updates so far

    def update(self, small_sq: float, big_sq: float, b_small: float, b_big: float) -> dict[str, float]:
        """Add one step's pair of squared gradient norms; returns the noise_scale/* metrics."""
        grad_sq, trace_sigma = two_batch_estimates(small_sq, big_sq, b_small, b_big)
        if math.isfinite(grad_sq) and math.isfinite(trace_sigma):
            self.grad_sq = self.ema * self.grad_sq + (1.0 - self.ema) * grad_sq
            self.trace_sigma = self.ema * self.trace_sigma + (1.0 - self.ema) * trace_sigma
            self.count += 1
        return self.metrics()

    def metrics(self) -> dict[str, float]:
        """B_simple and the bias-corrected EMAs of |G|^2 and tr(Sigma) (nan before the first update;
        B_simple is nan while the |G|^2 EMA is not positive: the noise swamps the signal)."""
        if self.count == 0:
            return dict.fromkeys(("noise_scale/b_simple", "noise_scale/grad_sq", "noise_scale/trace_sigma"), math.nan)
        correction = 1.0 - self.ema**self.count
        b_simple = self.trace_sigma / self.grad_sq if self.grad_sq > 0 else math.nan
        return {
            "noise_scale/b_simple": b_simple,
            "noise_scale/grad_sq": self.grad_sq / correction,
            "noise_scale/trace_sigma": self.trace_sigma / correction,
        }

    def state_dict(self) -> dict[str, float]:
        return {"grad_sq": self.grad_sq, "trace_sigma": self.trace_sigma, "count": self.count}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.grad_sq, self.trace_sigma = float(state["grad_sq"]), float(state["trace_sigma"])
        self.count = int(state["count"])
