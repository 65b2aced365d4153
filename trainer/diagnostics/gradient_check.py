"""Centred-difference gradient checks (appendix D): `gradcheck`, and every custom op of the project.

The estimate (D.1). For an entry x_i of a checked tensor, g_n = (f(x + h e_i) - f(x - h e_i)) / 2h,
with f = <r, fn(inputs)>: the output projected on a fixed random r, so every output entry counts.
Its error is truncation, h^2 |f'''| / 6, plus rounding, ~eps |f| / h (each evaluation is off by
~eps |f|). The sum is smallest at h = (3 eps |f| / |f'''|)^(1/3), so for a loss of unit scale
h = eps^(1/3): 6.1e-6 in float64 and 4.9e-3 in float32 (times |x_i| where |x_i| > 1), with an
error of ~eps^(2/3) |f| there: 3.7e-11 |f| and 2.4e-5 |f|.

The acceptance. Each entry's relative error |g_a - g_n| / max(|g_a| + |g_n|, tiny) must be below
1e-7 in float64 and 1e-3 in float32 (the CS231n rule). tiny = floor / threshold, where the floor
10 eps^(2/3) |f|_1 is what a correct gradient may be off by at the rule's step (|f|_1 = sum
|r_j out_j|, the magnitude the evaluations round at; 10: see ROUNDING_ALLOWANCE): a gradient
smaller than tiny is held to the absolute error `floor` instead, since no step resolves it
better. A tensor whose every gradient lies below the floor is not resolved and fails.

The diagnosis (D.2), from the worst entry of each failing tensor, re-evaluated at h / 2:
  kink            the one-sided slopes differ as much at h / 2 as at h (smooth: half as much)
  loss nearly flat every |g_a| of the tensor below the floor (D.2: loss ~linear at the point)
  step too small  the error is rounding-sized, or grows when h halves (rounding: O(eps / h))
  step too large  the error falls when h halves (truncation: O(h^2), 4x per halving)
  backward bug    the numeric value has converged (the same at h / 2) and disagrees; when some
                  tensors pass, "backward bug in one parameter type" names the failing ones
D.2's last row (fails only at batch size 1: BatchNorm statistics) does not apply: no op here has
batch statistics. Sampled entries (`max_entries_per_tensor`, seeded) keep it usable on real layers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

THRESHOLDS = {torch.float64: 1e-7, torch.float32: 1e-3}  # relative error accepted (CS231n)
# The rounding model counts one rounding of f per evaluation; a composite op rounds at each step.
# On the project's ops (custom_ops) a correct gradient's error at the rule's step reached 1.1x
# eps^(2/3) |f|_1 (and 0.6x outside the whole-GPT checks), so the floor allows 10x that.
ROUNDING_ALLOWANCE = 10.0
CAUSES = (
    "kink",
    "backward bug",
    "loss nearly flat",
    "step too small",
    "step too large",
    "unclear",
)  # most specific first
Backward = Callable[[torch.Tensor, list[torch.Tensor]], Sequence[torch.Tensor | None]]


def step_size(dtype: torch.dtype) -> float:
    """Appendix D's step: eps^(1/3), where truncation O(h^2) meets rounding O(eps / h)."""
    return _eps(dtype) ** (1 / 3)


def threshold(dtype: torch.dtype) -> float:
    """The relative error accepted at dtype: 1e-7 (float64), 1e-3 (float32)."""
    _eps(dtype)
    return THRESHOLDS[dtype]


def _eps(dtype: torch.dtype) -> float:
    if dtype not in THRESHOLDS:
        raise ValueError(f"gradcheck: {dtype} has too few bits for finite differences: use float64 or float32")
    return torch.finfo(dtype).eps


@dataclass
class TensorCheck:
    """One checked tensor: its worst entry (largest relative error) and what was found there."""

    name: str
    shape: tuple[int, ...]
    checked: int  # entries checked (all, or a seeded sample)
    max_rel_error: float
    worst_index: tuple[int, ...]
    analytic: float  # g_a at the worst entry
    numeric: float  # g_n at the worst entry
    passed: bool
    largest_gradient: float  # the largest |g_a| checked (0: no gradient reaches this tensor)
    # on failure, one of CAUSES
    cause: str | None = None


@dataclass
class GradcheckReport:
    """The outcome of `gradcheck`: per tensor, the worst entry; overall, pass / fail and a likely cause."""

    dtype: str
    h: float
    threshold: float
    tensors: list[TensorCheck]
    passed: bool
    likely_cause: str | None = None  # a sentence from D.2's table, on failure
    details: dict[str, Any] = field(default_factory=dict)  # the worst failing entry's h vs h / 2 figures

    @property
    def worst(self) -> TensorCheck:
        """The tensor with the largest relative error."""
        return max(self.tensors, key=lambda t: t.max_rel_error)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"gradcheck {self.dtype} h={self.h:.2g} threshold={self.threshold:.0e}: "
                 f"{'pass' if self.passed else 'FAIL'}"]  # fmt: skip
        for t in self.tensors:
            where = f"{t.name}{list(t.worst_index)}"
            lines.append(
                f"  {where:<28} rel {t.max_rel_error:.2e}  analytic {t.analytic:+.6e}  numeric {t.numeric:+.6e}"
                f"  ({t.checked} of {math.prod(t.shape)}){'' if t.passed else '  FAIL: ' + str(t.cause)}"
            )
        if self.likely_cause:
            lines.append(f"  likely cause: {self.likely_cause}")
        return "\n".join(lines)


def gradcheck(
    fn_or_module: Callable[..., Any] | nn.Module,
    inputs: Sequence[Any] | Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
    h: float | None = None,
    rtol: float | None = None,
    max_entries_per_tensor: int = 64,
    seed: int = 0,
    backward: Backward | None = None,
    threads: int | None = 1,
) -> GradcheckReport:
    """Compare autograd's gradient with centred differences (appendix D) for every input tensor that
    requires grad and, for an nn.Module, every parameter that does (by name).

    inputs: positional arguments (tensors named input0, input1, ...) or keyword arguments (named by
    key); other values pass through. The output (a tensor or a sequence of them) is reduced to
    <r, out> with r ~ N(0, 1) drawn from `seed`. dtype: the precision the step and threshold are
    chosen for (default: the checked tensors'); h, rtol: override the rule's step and threshold.
    Entries checked per tensor: all up to max_entries_per_tensor, else that many drawn from `seed`.
    backward(f, tensors) -> gradients replaces torch.autograd.grad (e.g. a scaled backward).
    threads: torch's intra-op threads while it runs, restored after (None: leave them). One by
    default: a check evaluates small inputs twice per entry, and waking idle threads for each call
    cost 60x on a loaded 2-core machine (causal_attention, 4 heads x 4 tokens: 15 s against 0.2 s).
    Numeric evaluations run under no_grad; every perturbed entry is restored bit for bit.
    """
    args, kwargs = (list(inputs), {}) if not isinstance(inputs, Mapping) else ([], dict(inputs))
    named = _checked_tensors(fn_or_module, args, kwargs)
    dtype = dtype or min((t.dtype for _, t in named), key=lambda d: torch.finfo(d).bits)
    h, rtol = h or step_size(dtype), rtol or threshold(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        originals = [t.detach().clone() for _, t in named]

        def call() -> Any:
            return fn_or_module(*args, **kwargs)

        with torch.no_grad():
            out = _flat(call())
        _check_unchanged(named, originals, "the function wrote to its inputs")
        probe = _Probe(call, out, dtype, h, rtol, seed)
        analytic = probe.analytic([t for _, t in named], backward)
        results = [
            probe.check_tensor(name, t, g_a, max_entries_per_tensor)
            for (name, t), g_a in zip(named, analytic, strict=True)
        ]
        _check_unchanged(named, originals, "a perturbed entry was not restored")
    finally:
        torch.set_num_threads(before)
    checks = [check for check, _ in results]
    diagnoses = {check.name: diagnosis for check, diagnosis in results if diagnosis is not None}
    passed = all(c.passed for c in checks)
    cause = None if passed else _likely_cause(checks, diagnoses, h, step_size(dtype))
    worst_failing = max((c for c in checks if not c.passed), key=lambda c: c.max_rel_error, default=None)
    details = diagnoses[worst_failing.name] if worst_failing is not None else {}
    return GradcheckReport(str(dtype).removeprefix("torch."), h, rtol, checks, passed, cause, details)


def _checked_tensors(fn: Any, args: list[Any], kwargs: dict[str, Any]) -> list[tuple[str, torch.Tensor]]:
    named = [(f"input{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    named = [(n, t) for n, t in named if isinstance(t, torch.Tensor) and t.requires_grad]
    if isinstance(fn, nn.Module):
        named += [(n, p) for n, p in fn.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("gradcheck: no input tensor or parameter requires grad: nothing to check")
    for name, t in named:
        if not t.is_leaf or not t.is_floating_point():
            raise ValueError(f"gradcheck: {name} must be a floating-point leaf tensor (detach().requires_grad_())")
    return named


def _check_unchanged(named: list[tuple[str, torch.Tensor]], originals: list[torch.Tensor], why: str) -> None:
    for (name, t), original in zip(named, originals, strict=True):
        if not torch.equal(t.detach(), original):
            raise RuntimeError(f"gradcheck: {name} changed: {why}")


def _flat(out: Any) -> torch.Tensor:
    """The output's floating-point entries as one vector (a tensor, or a sequence of tensors)."""
    outs = [out] if isinstance(out, torch.Tensor) else list(out)
    return torch.cat([o.reshape(-1) for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point()])


class _Probe:
    """f = <r, call()> at the point, its finite differences, and the floor they are judged against."""

    def __init__(
        self, call: Callable[[], Any], out: torch.Tensor, dtype: torch.dtype, h: float, rtol: float, seed: int
    ) -> None:
        self.call, self.h, self.rtol = call, h, rtol
        self.generator = torch.Generator().manual_seed(seed)
        self.r = torch.randn(out.shape, generator=self.generator, dtype=torch.float64).to(out.dtype)
        self.f0 = self.value()
        if self.value() != self.f0:
            raise ValueError("gradcheck: the function is not deterministic (dropout? set it to 0 or call .eval())")
        eps = _eps(dtype)
        fscale = float((self.r * out).abs().sum())  # |f|_1, the magnitude the evaluations round at
        self.rounding = eps * fscale  # an evaluation's rounding error
        self.floor = ROUNDING_ALLOWANCE * eps ** (2 / 3) * fscale  # a correct gradient's error at the rule's step

    def value(self) -> float:
        with torch.no_grad():
            return float((self.r * _flat(self.call())).sum())

    def analytic(self, tensors: list[torch.Tensor], backward: Backward | None) -> list[torch.Tensor]:
        with torch.enable_grad():
            f = (self.r * _flat(self.call())).sum()
            grads = backward(f, tensors) if backward else torch.autograd.grad(f, tensors, allow_unused=True)
        # allow_unused: a tensor the output does not depend on has a zero gradient
        return [torch.zeros_like(t) if g is None else g.detach().clone() for t, g in zip(tensors, grads, strict=True)]

    def centred(self, t: torch.Tensor, index: tuple[int, ...], h: float) -> tuple[float, float, float, float]:
        """(g_n, f(x + h), f(x - h), the step) at entry `index` of t; the entry is restored exactly."""
        with torch.no_grad():
            original = t[index].clone()
            step = h * max(1.0, abs(float(original)))  # relative step for large entries
            plus, minus = original + step, original - step  # rounded to t's dtype: divide by what was applied
            t[index] = plus
            f_plus = self.value()
            t[index] = minus
            f_minus = self.value()
            t[index] = original
        return (f_plus - f_minus) / (float(plus) - float(minus)), f_plus, f_minus, step

    def check_tensor(
        self, name: str, t: torch.Tensor, g_a: torch.Tensor, max_entries: int
    ) -> tuple[TensorCheck, dict[str, Any] | None]:
        """The worst of t's checked entries; on failure also its diagnosis."""
        n = t.numel()
        tiny = max(self.floor / self.rtol, torch.finfo(torch.float64).tiny)  # below it: judged against the floor
        worst = (-1.0, (), 0.0, 0.0, 0.0, 0.0)  # rel, index, g_a, g_n, f(x + h), f(x - h)
        largest = 0.0  # the largest |g_a| checked
        sample = torch.randperm(n, generator=self.generator)[:max_entries].sort().values.tolist()
        for i in range(n) if n <= max_entries else sample:
            index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), t.shape)) if t.dim() else ()
            analytic = float(g_a[index])
            numeric, f_plus, f_minus, _ = self.centred(t, index, self.h)
            rel = abs(analytic - numeric) / max(abs(analytic) + abs(numeric), tiny)
            largest = max(largest, abs(analytic))
            if rel > worst[0]:
                worst = (rel, index, analytic, numeric, f_plus, f_minus)
        rel, index, analytic, numeric, f_plus, f_minus = worst
        unresolved = 0 < largest < self.floor  # every gradient below what the rule's step resolves
        passed = rel < self.rtol and not unresolved
        check = TensorCheck(name, tuple(t.shape), min(n, max_entries), rel, index, analytic, numeric, passed, largest)
        if passed:
            return check, None
        where = f"{name}{list(index)}"
        if unresolved:
            check.cause = "loss nearly flat"
            return check, {"cause": check.cause, "where": where, "largest_gradient": largest, "floor": self.floor}
        diagnosis = {"where": where, **self.diagnose(t, index, analytic, numeric, f_plus, f_minus)}
        check.cause = diagnosis["cause"]
        return check, diagnosis

    def diagnose(
        self, t: torch.Tensor, index: tuple[int, ...], analytic: float, numeric: float, f_plus: float, f_minus: float
    ) -> dict[str, Any]:
        """Re-evaluate the worst entry at h / 2 and name the error's kind from how it scales."""
        numeric_half, f_plus_half, f_minus_half, step_half = self.centred(t, index, self.h / 2)
        step = 2 * step_half
        noise = self.rounding / step  # rounding error of g_n at this step: eps |f|_1 / h
        # one-sided slopes: their difference is h |f''| on a smooth function, a constant at a kink
        jump = abs(f_plus - 2 * self.f0 + f_minus) / step
        jump_half = abs(f_plus_half - 2 * self.f0 + f_minus_half) / step_half
        error, error_half = abs(numeric - analytic), abs(numeric_half - analytic)
        if jump_half > 0.75 * jump and jump_half > 100 * 2 * noise:
            cause = "kink"
        elif error < ROUNDING_ALLOWANCE * noise or error_half > 1.5 * error:
            cause = "step too small"
        elif error_half < 0.5 * error:
            cause = "step too large"
        elif abs(numeric - numeric_half) < 0.1 * error:
            cause = "backward bug"
        else:
            cause = "unclear"
        return {
            "cause": cause, "h": step, "error": error, "error_half_h": error_half, "jump": jump,
            "jump_half_h": jump_half, "noise": noise, "numeric_half_h": numeric_half,
        }  # fmt: skip


def _likely_cause(checks: list[TensorCheck], diagnoses: dict[str, dict[str, Any]], h: float, h_rule: float) -> str:
    """One sentence per cause found, in D.2's words, most specific first."""
    failed = [c for c in checks if not c.passed]
    by_cause: dict[str, list[TensorCheck]] = {cause: [] for cause in CAUSES}
    for c in failed:
        by_cause[c.cause or "unclear"].append(c)
    # tensors no gradient reaches pass trivially: they do not show that the backward is right elsewhere
    passed_names = ", ".join(c.name for c in checks if c.passed and c.largest_gradient > 0)
    sentences = []
    for cause, group in by_cause.items():
        if not group:
            continue
        d = diagnoses[max(group, key=lambda c: c.max_rel_error).name]
        names = ", ".join(c.name for c in group)
        if cause == "kink":
            sentences.append(
                f"kink: the one-sided slopes at {d['where']} differ by {d['jump']:.3g} at h and {d['jump_half_h']:.3g}"
                " at h/2, so the point lies within h of a non-differentiable point (ReLU, max, abs): move it away"
            )
        elif cause == "loss nearly flat":
            sentences.append(
                f"loss nearly flat (linear) in {names} at the point: every gradient (at most "
                f"{d['largest_gradient']:.2g}) is below the noise floor 10 eps^(2/3)|f|_1 = {d['floor']:.2g}: "
                "pick a point where the loss varies, or use float64"
            )
        elif cause == "step too small":
            sentences.append(
                f"step too small or float32 precision ({names}): rounding error O(eps/h) dominates (at "
                f"{d['where']} the error is {d['error']:.2g} at h, {d['error_half_h']:.2g} at h/2): "
                + (f"use h = eps^(1/3) = {h_rule:.2g}, or float64" if h < h_rule else "use float64")
            )
        elif cause == "step too large":
            sentences.append(
                f"step too large ({names}): truncation error O(h^2) dominates (at {d['where']} the error falls "
                f"{d['error'] / max(d['error_half_h'], 1e-300):.1f}x when h halves): "
                + (
                    f"use h = eps^(1/3) = {h_rule:.2g}"
                    if h > h_rule
                    else "the point's curvature is large for this precision: use float64, or a smaller h"
                )
            )
        elif cause == "backward bug" and passed_names:
            sentences.append(
                f"backward bug in one parameter type: the gradient of {names} disagrees with a converged "
                f"numeric derivative (worst {d['where']}) while {passed_names} agree: check that input's backward"
            )
        elif cause == "backward bug":
            sentences.append(
                f"backward bug: every checked tensor ({names}) disagrees with a converged numeric derivative: a "
                "formula they share, or a forward the backward does not differentiate (detached terms, state)"
            )
        else:
            sentences.append(f"unclear ({names}): the numeric derivative did not settle when h halved")
    return "; ".join(sentences)


def format_table(results: list[dict[str, Any]]) -> str:
    """The CLI's table (one row per op) and, below it, the full likely cause of each failure."""
    header = ("op", "tensors", "worst rel err", "worst at", "h", "threshold", "result", "likely cause")
    rows = []
    for r in results:
        report = r["report"]
        if report is None:
            rows.append((r["op"], "-", "-", "-", "-", "-", r["result"], r["reason"]))
            continue
        worst = max(report["tensors"], key=lambda t: t["max_rel_error"])
        # each sentence's head: "kink", "backward bug in one parameter type", "step too large (B)", ...
        causes = [sentence.split(":")[0] for sentence in (report["likely_cause"] or "").split("; ") if sentence]
        rows.append((
            r["op"], str(len(report["tensors"])), f"{worst['max_rel_error']:.1e}",
            f"{worst['name']}{list(worst['worst_index'])}", f"{report['h']:.1e}", f"{report['threshold']:.0e}",
            r["result"], ", ".join(causes) or "-",
        ))  # fmt: skip
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    failures = [f"{r['op']}: {r['report']['likely_cause']}" for r in results if r["result"] == "FAIL"]
    return "\n".join(lines + (["", "likely causes:", *failures] if failures else []))
