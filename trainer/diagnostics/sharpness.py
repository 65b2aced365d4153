"""Sharpness: the top eigenvalue of the loss's Hessian, by Lanczos iteration on Hessian-vector products.

Two ways to get Hv:
- double backward: g = dL/dθ with create_graph=True, then Hv = d<g, v>/dθ. Exact, but needs every
  kernel's backward to be differentiable (not SDPA's fused flash / memory-efficient kernels, on a
  GPU or the CPU; not a custom autograd.Function marked once_differentiable).
- finite difference: Hv ≈ (g(θ + εv) - g(θ - εv)) / 2ε, from two ordinary gradients, so it works
  with any model, sharded ones included; error O(ε²) from the third derivative plus rounding.

Vectors are lists of tensors shaped like the parameters. Every inner product and norm goes through
`dot`, so a caller with sharded parameters passes one that all-reduces over ranks. The loss must be
a deterministic function of θ (a fixed batch, dropout off), or Hv is noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import NoReturn

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

Vectors = list[Tensor]  # one tensor per parameter
HVP = Callable[[Vectors], Vectors]
Dot = Callable[[Vectors, Vectors], Tensor]


def default_dot(a: Vectors, b: Vectors) -> Tensor:
    """The Euclidean inner product of two lists of tensors: the sum of per-tensor dot products
    (summed in at least float32)."""
    dtype = torch.promote_types(a[0].dtype, torch.float32)
    return torch.stack([torch.sum(x * y, dtype=dtype) for x, y in zip(a, b, strict=True)]).sum()


def double_backward_hvp(loss_fn: Callable[[], Tensor], params: list[Tensor]) -> HVP:
    """Hv by double backward. Runs loss_fn and its create_graph backward once, now; each product
    is then one more backward through that graph (kept alive while the returned function lives)."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True, allow_unused=True)
    # A gradient with no graph is constant in θ (loss linear in it, or unused): its rows of H are 0.
    live = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    _refuse_once_differentiable([grads[i] for i in live])

    def hvp(v: Vectors) -> Vectors:
        if not live:
            return [torch.zeros_like(p) for p in params]
        # d<g, v>/dθ, with v held constant: grad_outputs=v is that without building the sum.
        out = torch.autograd.grad(
            [grads[i] for i in live], params, grad_outputs=[v[i] for i in live], retain_graph=True, allow_unused=True
        )
        return [torch.zeros_like(p) if h is None else h.detach() for p, h in zip(params, out, strict=True)]

    return hvp


def _refuse_once_differentiable(grads: Vectors) -> None:
    """Raise if the gradient's graph passes through a once_differentiable Function.

    Its backward output hangs off an error node whose only inputs are fresh leaves, not θ, so a
    second backward to θ prunes it and silently drops that path's share of H instead of raising.
    (Kernels with no derivative of their backward, like SDPA's fused ones, do raise when reached.)
    """
    stack, seen = [g.grad_fn for g in grads], set()
    while stack:  # iterative: a deep model's backward graph would overflow recursion
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node.name() == "torch::autograd::Error":
            raise RuntimeError("double backward through a Function marked @once_differentiable")
        stack.extend(next_node for next_node, _ in node.next_functions)


def finite_difference_hvp(
    grad_fn: Callable[[], Vectors], params: list[Tensor], eps: float | None = None, *, dot: Dot | None = None
) -> HVP:
    """Hv ≈ (g(θ + εv) - g(θ - εv)) / 2ε, where grad_fn() returns the gradient at the current params
    (it may run loss.backward() and return the .grad tensors: they are copied before the next call).

    Step rule: ε = eps (1 + rms(θ)) / |v|, so the step εv has norm eps (1 + rms(θ)), the size of one
    entry's relative step; eps defaults to the cube root of the dtype's machine epsilon (6.1e-6 in
    float64, 4.9e-3 in float32), which balances the O(ε²) truncation against the O(machine eps / ε)
    rounding of a central difference. Not |θ|: the norm grows with the parameter count, and a step
    that long leaves the quadratic region (a 0.9M-parameter GPT in fp32, exact λmax 27.0: a step of
    eps (1 + |θ|) = 0.19 gave 14.8; of eps (1 + rms(θ)) = 0.005, within 0.5%). The params are perturbed in place under no_grad and the saved values copied
    back after each gradient (also on error), so they end bitwise as they were; that keeps one extra
    copy of the params. .grad is left holding the gradient at θ - εv: call between steps, not inside
    an accumulation.
    """
    dot = dot or default_dot
    if eps is None:
        eps = torch.finfo(params[0].dtype).eps ** (1 / 3)
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        sizes = [torch.tensor(float(p.numel()), device=p.device, dtype=torch.float64) for p in params]
        count = float(dot(sizes, [torch.ones_like(t) for t in sizes]))  # host sync (once): every rank's entries
        theta_rms = math.sqrt(float(dot(saved, saved)) / max(count, 1.0))  # host sync (once)

    def gradient_at(v: Vectors, step: float) -> Vectors:
        try:
            with torch.no_grad():
                for p, v_i in zip(params, v, strict=True):
                    p.add_(v_i, alpha=step)
            return [g.detach().clone() for g in grad_fn()]  # a copy: grad_fn may reuse its buffers
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved, strict=True):
                    p.copy_(s)  # copied back, not subtracted: θ + εv - εv need not round to θ

    def hvp(v: Vectors) -> Vectors:
        v_norm = math.sqrt(float(dot(v, v)))  # host sync
        if v_norm == 0:
            return [torch.zeros_like(p) for p in params]
        step = eps * (1 + theta_rms) / v_norm
        plus = gradient_at(v, step)
        minus = gradient_at(v, -step)
        return [(a - b) / (2 * step) for a, b in zip(plus, minus, strict=True)]

    return hvp


def top_eigenvalue(
    hvp: HVP,
    like: Vectors,
    iterations: int,
    *,
    dot: Dot | None = None,
    generator: torch.Generator | None = None,
    tol: float = 1e-3,
) -> tuple[float, int]:
    """The largest (algebraic) eigenvalue of the symmetric operator hvp, and the Hv products used.

    Lanczos from a random start (from `generator`; default seeded 0): k products build a k x k
    tridiagonal matrix T whose largest eigenvalue approaches λmax from below, far faster than power
    iteration when eigenvalues crowd λmax or a negative one is larger in magnitude (at a saddle, early
    in training), where power iteration converges to the wrong end or stalls. The three-term
    recurrence keeps three vectors (no basis: a model-sized copy each); losing orthogonality only
    adds copies of converged eigenvalues, which does not move the largest. Stops once λmax changes
    by less than tol (relative) in one product, or an invariant subspace is found.
    """
    dot = dot or default_dot
    generator = generator or torch.Generator().manual_seed(0)
    v = [torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device).to(t.device) for t in like]
    scale = 1 / torch.sqrt(dot(v, v))
    v = [x * scale for x in v]
    previous: Vectors | None = None
    alphas: list[float] = []
    betas: list[float] = []
    estimate = math.nan
    for k in range(1, iterations + 1):
        w = hvp(v)
        alpha = float(dot(w, v))  # host sync: a few per product
        alphas.append(alpha)
        w = [a - alpha * b for a, b in zip(w, v, strict=True)]
        if previous is not None:
            w = [a - betas[-1] * b for a, b in zip(w, previous, strict=True)]
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        spectrum = torch.linalg.eigvalsh(tridiagonal)
        last, estimate = estimate, float(spectrum[-1])
        beta = float(torch.sqrt(dot(w, w)))
        size = float(spectrum.abs().max())
        if beta <= 1e-12 * max(size, 1e-30) or abs(estimate - last) <= tol * abs(estimate):
            return estimate, k
        betas.append(beta)
        previous, v = v, [x / beta for x in w]
    return estimate, iterations


class _NoDoubleBackward(Exception):
    """The double-backward path raised before its first product was made: a kernel without a
    derivative of its backward."""


def sharpness(
    loss_fn: Callable[[], Tensor],
    params: list[Tensor],
    iterations: int,
    method: str = "auto",
    grad_fn: Callable[[], Vectors] | None = None,
    dot: Dot | None = None,
    generator: torch.Generator | None = None,
    tol: float = 1e-3,
) -> tuple[float, str]:
    """λmax of the Hessian of loss_fn() at params, and the method that produced it.

    method: double_backward, finite_difference, or auto: double backward, falling back to finite
    difference when building it or its first product raises a RuntimeError (a kernel without double
    backward; other errors, out-of-memory, and errors in later products propagate). grad_fn (finite
    difference) returns the gradient at the current params; by default autograd.grad of loss_fn().
    Sharded params: pass grad_fn and dot (and method=finite_difference: no double backward through
    the sharding's hooks).
    """
    if method not in ("auto", "double_backward", "finite_difference"):
        raise ValueError(f"sharpness method={method!r}: use auto, double_backward or finite_difference")
    generator = generator or torch.Generator().manual_seed(0)
    if method == "double_backward":
        hvp = double_backward_hvp(loss_fn, params)
        return top_eigenvalue(hvp, params, iterations, dot=dot, generator=generator, tol=tol)[0], method
    if method == "auto":
        start = generator.get_state()  # the fallback starts from the same random vector
        try:
            hvp = _guard_first_product(lambda: double_backward_hvp(loss_fn, params))
            return top_eigenvalue(hvp, params, iterations, dot=dot, generator=generator, tol=tol)[0], "double_backward"
        except _NoDoubleBackward as error:
            logger.info("sharpness: no double backward (%s); using finite differences", error.__cause__)
        generator.set_state(start)
    if grad_fn is None:

        def grad_fn() -> Vectors:
            return list(torch.autograd.grad(loss_fn(), params))

    hvp = finite_difference_hvp(grad_fn, params, dot=dot)
    return top_eigenvalue(hvp, params, iterations, dot=dot, generator=generator, tol=tol)[0], "finite_difference"


def _guard_first_product(build: Callable[[], HVP]) -> HVP:
    """build() and the first product of what it returns, with a RuntimeError in either raised as
    _NoDoubleBackward (a few kernels refuse create_graph; most fail only when differentiated)."""
    try:
        hvp = build()
    except RuntimeError as error:
        _raise_unsupported(error)
    made_one = False

    def guarded(v: Vectors) -> Vectors:
        nonlocal made_one
        if made_one:
            return hvp(v)
        try:
            out = hvp(v)
        except RuntimeError as error:
            _raise_unsupported(error)
        made_one = True
        return out

    return guarded


def _raise_unsupported(error: RuntimeError) -> NoReturn:
    if isinstance(error, torch.cuda.OutOfMemoryError):  # a RuntimeError too, but not this kind
        raise error
    raise _NoDoubleBackward from error
