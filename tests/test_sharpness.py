"""Sharpness against exact top Hessian eigenvalues: quadratics with chosen spectra, and a small
float64 MLP whose full Hessian comes from torch.autograd.functional.hessian. Both Hessian-vector
products (double backward, finite difference), the fallback between them, and that finite
differences leave the parameters bitwise as they were.

Tolerances (relative, float64, power iteration to tol 1e-12), with the errors measured: double
backward 1e-9 (exact products, only convergence is left: <= 8e-12); finite difference 1e-8 on the
quadratics (no third derivative, rounding only: <= 4e-12), 1e-7 on the MLP (O(ε²) truncation with a
step of norm 6.1e-6 (1 + |θ|): 4.6e-10), 1e-6 on the attention layer (larger third derivatives: 6.8e-8,
falling as ε² with the step: 1.6e-6 at eps 3e-5, 1.8e-5 at 1e-4).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend, sdpa_kernel

from trainer.diagnostics.sharpness import (
    default_dot,
    double_backward_hvp,
    finite_difference_hvp,
    sharpness,
    top_eigenvalue,
)

ITERATIONS, TOL = 300, 1e-12


def quadratic(eigenvalues: list[float], seed: int = 0):
    """loss = θ'Aθ / 2 + b'θ with spectrum(A) = eigenvalues, θ held as a (2, 3) and a (n - 6,) tensor."""
    gen = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    A = q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T
    b = torch.randn(n, generator=gen, dtype=torch.float64)
    params = [torch.randn(2, 3, generator=gen, dtype=torch.float64, requires_grad=True)]
    params.append(torch.randn(n - 6, generator=gen, dtype=torch.float64, requires_grad=True))

    def loss_fn() -> torch.Tensor:
        theta = torch.cat([p.flatten() for p in params])
        return 0.5 * theta @ A @ theta + b @ theta

    return loss_fn, params


@pytest.mark.parametrize("method", ["double_backward", "finite_difference"])
@pytest.mark.parametrize(
    "eigenvalues",
    [
        [6.0, 3.0, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0, -4.0],  # λmax dominates
        [4.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -6.0, -9.0],  # |-9| dominates: the shifted second run
    ],
)
def test_quadratic_top_eigenvalue(eigenvalues: list[float], method: str) -> None:
    loss_fn, params = quadratic(eigenvalues)
    got, used = sharpness(loss_fn, params, ITERATIONS, method=method, tol=TOL)
    assert used == method
    assert got == pytest.approx(max(eigenvalues), rel=1e-9 if method == "double_backward" else 1e-8)


def test_lanczos_stops_at_an_invariant_subspace() -> None:
    diagonal = torch.tensor([5.0, 1.0, 0.5], dtype=torch.float64)

    def hvp(v: list[torch.Tensor]) -> list[torch.Tensor]:
        return [diagonal * v[0]]

    like = [torch.zeros(3, dtype=torch.float64)]
    value, used = top_eigenvalue(hvp, like, 100, tol=1e-10)
    assert value == pytest.approx(5.0, rel=1e-10) and used <= 3  # 3 dimensions: exact in 3 products
    value, used = top_eigenvalue(lambda v: [-h for h in hvp(v)], like, 100, tol=1e-10)
    assert value == pytest.approx(-0.5, rel=1e-10) and used <= 3  # spectrum -5, -1, -0.5


def test_lanczos_finds_the_top_when_a_negative_eigenvalue_dominates_and_others_crowd_it() -> None:
    """Where power iteration (even shifted by the most negative eigenvalue) stalls: 200 eigenvalues
    in [-236, 43.4] with the next below the top at 42.9; 60 products pin λmax to 1e-6."""
    g = torch.Generator().manual_seed(0)
    eigenvalues = torch.cat([torch.tensor([-236.0, 43.4, 42.9]), torch.empty(197).uniform_(-60, 40, generator=g)])
    basis, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    matrix = basis @ torch.diag(eigenvalues.double()) @ basis.T
    value, used = top_eigenvalue(lambda v: [matrix @ v[0]], [torch.zeros(200, dtype=torch.float64)], 60, tol=1e-9)
    assert value == pytest.approx(43.4, rel=1e-6), used


SHAPES = [(5, 3), (5,), (2, 5), (2,)]  # W1, b1, W2, b2 of a 3 -> 5 -> 2 tanh MLP: 32 parameters


class OnceDifferentiableTanh(torch.autograd.Function):
    """tanh whose backward cannot itself be differentiated, like a fused attention kernel's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def mlp_problem(activation=torch.tanh):
    """Parameters (list), loss_fn() of them, and the exact top eigenvalue (with the spectrum's gap)."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params[1] *= 1e-6  # b1 just off zero, as biases start: entries an ε-step is not small against
    params = [p.requires_grad_() for p in params]
    X = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    Y = torch.randn(16, 2, generator=gen, dtype=torch.float64)

    def loss_of(W1, b1, W2, b2, activation=activation) -> torch.Tensor:
        return (activation(X @ W1.T + b1) @ W2.T + b2 - Y).square().mean()

    def loss_of_flat(flat: torch.Tensor) -> torch.Tensor:  # the reference: always torch.tanh
        pieces = flat.split([p.numel() for p in params])
        return loss_of(*(piece.view(p.shape) for piece, p in zip(pieces, params, strict=True)), activation=torch.tanh)

    flat = torch.cat([p.detach().flatten() for p in params])
    spectrum = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss_of_flat, flat))  # ascending
    return params, lambda: loss_of(*params), spectrum


def test_mlp_double_backward_matches_exact_hessian() -> None:
    params, loss_fn, spectrum = mlp_problem()
    exact = spectrum[-1].item()
    assert spectrum[-2] < 0.6 * exact and -spectrum[0] < 0.5 * exact  # a clear gap: 14.67 vs 8.20, -6.84
    got, method = sharpness(loss_fn, params, ITERATIONS, method="auto", tol=TOL)
    assert method == "double_backward"
    assert got == pytest.approx(exact, rel=1e-9)


def test_mlp_finite_difference_matches_and_restores_params_bitwise() -> None:
    params, loss_fn, spectrum = mlp_problem()
    before = [p.detach().clone() for p in params]

    def grad_fn() -> list[torch.Tensor]:
        # As the loop's would: backward into .grad, reused in place across calls, returned as is.
        for p in params:
            if p.grad is not None:
                p.grad.zero_()
        loss_fn().backward()
        return [p.grad for p in params]

    got, method = sharpness(loss_fn, params, ITERATIONS, method="finite_difference", grad_fn=grad_fn, tol=TOL)
    assert method == "finite_difference"
    assert got == pytest.approx(spectrum[-1].item(), rel=1e-7)
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before, strict=True))
    # Subtracting a step of that size back would not have: θ + εv - εv rounds away from θ in b1.
    theta = torch.cat([b.flatten() for b in before])
    v = torch.randn_like(theta)
    step = 6.1e-6 * (1 + theta.norm()) * v / v.norm()
    assert not torch.equal(theta + step - step, theta)


def test_finite_difference_product_matches_double_backward() -> None:
    params, loss_fn, _ = mlp_problem()
    v = [torch.randn_like(p) for p in params]
    exact = double_backward_hvp(loss_fn, params)(v)
    approx = finite_difference_hvp(lambda: list(torch.autograd.grad(loss_fn(), params)), params)(v)
    error = torch.cat([(a - e).flatten() for a, e in zip(approx, exact, strict=True)]).norm()
    assert error < 1e-8 * torch.cat([e.flatten() for e in exact]).norm()


def test_auto_falls_back_without_double_backward() -> None:
    params, loss_fn, spectrum = mlp_problem(activation=OnceDifferentiableTanh.apply)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        sharpness(loss_fn, params, ITERATIONS, method="double_backward")
    got, method = sharpness(loss_fn, params, ITERATIONS, method="auto", tol=TOL)
    assert method == "finite_difference"
    assert got == pytest.approx(spectrum[-1].item(), rel=1e-7)  # spectrum of the same MLP with torch.tanh
    # Why double backward must refuse, not just try: autograd prunes the Function's error node and
    # drops its share of H without a word. f(x, w) = sum(tanh(x)) sum(w): d²f/dx_i² = tanh''(x_i) sum(w).
    point = torch.tensor([0.3, -0.7, 1.1, 0.5, 0.2, 0.9], dtype=torch.float64)
    for tanh, diagonal_is_zero in [(OnceDifferentiableTanh.apply, True), (torch.tanh, False)]:
        hessian = torch.autograd.functional.hessian(lambda f, tanh=tanh: tanh(f[:3]).sum() * f[3:].sum(), point)
        assert bool(torch.all(torch.diagonal(hessian)[:3] == 0)) == diagonal_is_zero

    def broken() -> torch.Tensor:
        raise ValueError("not a missing derivative")

    with pytest.raises(ValueError, match="not a missing derivative"):  # only RuntimeError falls back
        sharpness(broken, params, ITERATIONS, method="auto")


def test_auto_falls_back_on_fused_attention_and_shifts() -> None:
    """A real kernel without double backward: CPU SDPA's flash kernel (as the fused GPU ones). Here
    the most negative eigenvalue (-30.26) dominates, so the second, shifted run finds λmax = 17.85."""
    gen = torch.Generator().manual_seed(20)
    T, C = 6, 4
    params = [torch.randn(C, C, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    x, y = (torch.randn(1, 1, T, C, generator=gen, dtype=torch.float64) for _ in range(2))  # (B, nh, T, hs)

    def fused(Wq: torch.Tensor, Wk: torch.Tensor, Wv: torch.Tensor) -> torch.Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(x @ Wq, x @ Wk, x @ Wv, is_causal=True)

    def reference(Wq: torch.Tensor, Wk: torch.Tensor, Wv: torch.Tensor) -> torch.Tensor:  # twice differentiable
        scores = (x @ Wq) @ (x @ Wk).transpose(-1, -2) / C**0.5  # (B, nh, T, T)
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        return scores.softmax(-1) @ (x @ Wv)

    flat = torch.cat([p.detach().flatten() for p in params])
    hessian = torch.autograd.functional.hessian(lambda f: (reference(*f.view(3, C, C)) - y).square().mean(), flat)
    spectrum = torch.linalg.eigvalsh(hessian)
    assert spectrum[-1] < -spectrum[0]  # the case that needs the shift
    got, method = sharpness(lambda: (fused(*params) - y).square().mean(), params, ITERATIONS, tol=TOL)
    assert method == "finite_difference"
    assert got == pytest.approx(spectrum[-1].item(), rel=1e-6)


def test_norms_only_through_dot(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sharded caller's dot all-reduces; a norm taken any other way would see one shard. Here dot
    counts every vector twice (as an all-reduce over replicated copies would): λ is unchanged."""
    params, loss_fn, spectrum = mlp_problem()
    calls = []

    def doubled(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
        calls.append(1)
        return 2 * default_dot(a, b)

    def no_norm(*args, **kwargs):
        raise AssertionError("a norm outside dot")

    for owner, name in [(torch, "norm"), (torch.linalg, "vector_norm"), (torch.linalg, "norm"), (torch.Tensor, "norm")]:
        monkeypatch.setattr(owner, name, no_norm)
    for method in ("double_backward", "finite_difference"):
        got, _ = sharpness(loss_fn, params, ITERATIONS, method=method, dot=doubled, tol=TOL)
        assert got == pytest.approx(spectrum[-1].item(), rel=1e-7)
    assert calls
