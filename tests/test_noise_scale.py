"""The gradient noise scale against exact values: Gaussian per-example gradients with a chosen G and
Sigma, and least squares on fixed data whose per-example gradients are known in closed form (batch
gradients from autograd). The small batch is the first b_small examples of the big one, as the
first micro-batch of an accumulated step is."""

from __future__ import annotations

import io
import math

import pytest
import torch

from trainer.diagnostics.noise_scale import NoiseScale, two_batch_estimates

STEPS, B_SMALL, B_BIG = 20_000, 4, 32


def assert_unbiased(samples: torch.Tensor, exact: float, rel: float | None = 0.03) -> None:
    """The sample mean is within 4 standard errors of `exact`, and (unless rel is None) within `rel` of it."""
    mean, stderr = samples.mean().item(), samples.std().item() / math.sqrt(len(samples))
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    assert rel is None or abs(mean - exact) < rel * abs(exact), (mean, exact)


def test_two_batch_estimates_invert_the_expected_norms() -> None:
    # E|g_B|^2 = |G|^2 + tr(Sigma) / B, so the expected norms give back (|G|^2, tr(Sigma)) exactly.
    grad_sq, trace = 0.7, 11.0
    got = two_batch_estimates(grad_sq + trace / 3, grad_sq + trace / 48, 3, 48)
    assert got == pytest.approx((grad_sq, trace), rel=1e-12)
    with pytest.raises(ValueError, match="b_small < b_big"):
        two_batch_estimates(1.0, 1.0, 8, 8)


def test_gaussian_gradients_nested_batches() -> None:
    """g_i = G + xi_i, xi_i ~ N(0, Sigma): |G|^2 = 1, tr(Sigma) = 16, so B_simple = 16."""
    gen = torch.Generator().manual_seed(0)
    d = 8
    G = torch.randn(d, generator=gen, dtype=torch.float64)
    G /= G.norm()
    root = torch.randn(d, d, generator=gen, dtype=torch.float64)
    sigma = root @ root.T
    sigma *= 16 / sigma.trace()
    xi = torch.randn(STEPS, B_BIG, d, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(sigma).T
    small_sq = (G + xi[:, :B_SMALL].mean(1)).square().sum(1)  # (STEPS,): the small batch inside the big
    big_sq = (G + xi.mean(1)).square().sum(1)
    grad_sq, trace = two_batch_estimates(small_sq, big_sq, B_SMALL, B_BIG)
    assert_unbiased(grad_sq, 1.0)
    assert_unbiased(trace, 16.0)
    assert (trace.mean() / grad_sq.mean()).item() == pytest.approx(16.0, rel=0.03)

    # The class over the same steps: its EMA ratio (ema 0.99, ~100-step window) averages to B_simple
    # (+0.7% here; the ratio of EMAs is biased up a little, more so with shorter windows).
    noise = NoiseScale(ema=0.99)
    pairs = zip(small_sq.tolist(), big_sq.tolist(), strict=True)
    b_simple = [noise.update(s, b, B_SMALL, B_BIG)["noise_scale/b_simple"] for s, b in pairs]
    assert sum(b_simple[1000:]) / len(b_simple[1000:]) == pytest.approx(16.0, rel=0.05)


def least_squares_problem(n: int, d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]:
    """Data X (n, d), y (n,), a point theta (d,), and at theta the exact |G|^2 and tr(Sigma) of one
    example drawn uniformly: its gradient is g_i = x_i (x_i . theta - y_i), of loss_i = (x_i . theta - y_i)^2 / 2.
    theta is 1.5 away from the noiseless solution, which puts B_simple near 25 for d = 16."""
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(n, d, generator=gen, dtype=torch.float64)
    solution = torch.randn(d, generator=gen, dtype=torch.float64)
    y = X @ solution + torch.randn(n, generator=gen, dtype=torch.float64)
    offset = torch.randn(d, generator=gen, dtype=torch.float64)
    theta = solution + 1.5 * offset / offset.norm()
    per_example = X * (X @ theta - y)[:, None]  # (n, d)
    G = per_example.mean(0)
    trace = (per_example - G).square().sum(1).mean().item()  # population covariance: 1 / n
    return X, y, theta, G.square().sum().item(), trace


def batch_gradients(X: torch.Tensor, y: torch.Tensor, theta: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(steps, d): row s is autograd's gradient at theta of the mean loss over the examples index[s]."""
    thetas = theta.expand(len(index), -1).clone().requires_grad_()  # (steps, d): one copy of theta per step
    residual = (X[index] @ thetas[:, :, None]).squeeze(-1) - y[index]  # (steps, batch)
    (0.5 * residual.square()).mean(1).sum().backward()  # steps do not interact: each row gets its own gradient
    return thetas.grad


def test_least_squares_autograd_nested_batches() -> None:
    X, y, theta, grad_sq_exact, trace_exact = least_squares_problem(n=256, d=16)
    gen = torch.Generator().manual_seed(2)
    index = torch.randint(len(X), (STEPS, B_BIG), generator=gen)  # i.i.d. draws (with replacement)
    small_sq = batch_gradients(X, y, theta, index[:, :B_SMALL]).square().sum(1)
    big_sq = batch_gradients(X, y, theta, index).square().sum(1)
    grad_sq, trace = two_batch_estimates(small_sq, big_sq, B_SMALL, B_BIG)
    # Heavier tails than the Gaussian case: ~0.8% standard error each, ~1.3% on the ratio.
    assert_unbiased(grad_sq, grad_sq_exact, rel=0.04)
    assert_unbiased(trace, trace_exact, rel=0.04)
    assert (trace.mean() / grad_sq.mean()).item() == pytest.approx(trace_exact / grad_sq_exact, rel=0.05)


def test_least_squares_without_replacement_has_the_finite_population_bias() -> None:
    """Batches of distinct examples from n = 12: the means are those the module docstring gives
    (E trace = tr(Sigma) n / (n - 1), E |G|^2 = |G|^2 - tr(Sigma) / (n - 1)), not the i.i.d. ones."""
    X, y, theta, grad_sq_exact, trace_exact = least_squares_problem(n=12, d=4)
    n, b_small, b_big = len(X), 2, 8
    gen = torch.Generator().manual_seed(3)
    index = torch.rand(STEPS, n, generator=gen).argsort(1)[:, :b_big]  # distinct examples per step
    small_sq = batch_gradients(X, y, theta, index[:, :b_small]).square().sum(1)
    big_sq = batch_gradients(X, y, theta, index).square().sum(1)
    grad_sq, trace = two_batch_estimates(small_sq, big_sq, b_small, b_big)
    assert_unbiased(trace, trace_exact * n / (n - 1))
    assert_unbiased(grad_sq, grad_sq_exact - trace_exact / (n - 1), rel=None)  # near 0 (-0.2 vs |G|^2 = 1.04)
    stderr = trace.std().item() / math.sqrt(STEPS)
    assert abs(trace.mean().item() - trace_exact) > 6 * stderr  # the i.i.d. value is told apart (~9-10)


def test_ema_bias_correction_and_guards() -> None:
    noise = NoiseScale(ema=0.9)
    assert math.isnan(noise.metrics()["noise_scale/b_simple"])
    first = noise.update(1.5, 1.0, 2, 8)  # estimates: |G|^2 = (8 - 3) / 6, tr(Sigma) = 0.5 / (3 / 8)
    assert first["noise_scale/grad_sq"] == pytest.approx(5 / 6, rel=1e-12)  # corrected: not 0.1 x the estimate
    assert first["noise_scale/trace_sigma"] == pytest.approx(4 / 3, rel=1e-12)
    assert first["noise_scale/b_simple"] == pytest.approx(1.6, rel=1e-12)
    second = noise.update(3.0, 1.0, 2, 8)  # estimates (1 / 3, 16 / 3); corrected EMA: (0.9 x1 + x2) / 1.9
    assert second["noise_scale/grad_sq"] == pytest.approx((0.9 * 5 / 6 + 1 / 3) / 1.9, rel=1e-12)
    assert second["noise_scale/trace_sigma"] == pytest.approx((0.9 * 4 / 3 + 16 / 3) / 1.9, rel=1e-12)
    assert noise.update(math.inf, 1.0, 2, 8) == second  # a non-finite step leaves the EMAs alone

    noisy = NoiseScale(ema=0.9)
    got = noisy.update(5.0, 1.0, 2, 8)  # noise swamps the signal: |G|^2 estimate (8 - 10) / 6 < 0
    assert got["noise_scale/grad_sq"] < 0 and math.isnan(got["noise_scale/b_simple"])


def test_resume_continues_bitwise() -> None:
    gen = torch.Generator().manual_seed(4)
    pairs = (1.0 + torch.rand(40, 2, generator=gen, dtype=torch.float64)).tolist()
    whole = NoiseScale()
    expected = [whole.update(s, b, 8, 64) for s, b in pairs]

    first = NoiseScale()
    for s, b in pairs[:20]:
        first.update(s, b, 8, 64)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as a checkpoint stores it
    buffer.seek(0)
    resumed = NoiseScale()
    resumed.load_state_dict(torch.load(buffer))
    assert [resumed.update(s, b, 8, 64) for s, b in pairs[20:]] == expected[20:]  # ==: bitwise
