"""trainer.diagnostics.gradcheck (appendix D): the estimator against its exact value, the step-size
rule, each diagnosis of D.2 on a case built to have it, and every custom op of the project."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from trainer.diagnose import main as diagnose
from trainer.diagnostics import custom_ops, gradcheck
from trainer.diagnostics.custom_ops import OPS, Case, CustomOp, check_op
from trainer.diagnostics.gradient_check import step_size, threshold
from trainer.parallel.base import TorchStrategy

f64, f32 = torch.float64, torch.float32


class MulWrongInY(torch.autograd.Function):
    """x * y whose backward is right for x and off by 1 at y[3]: a bug in one input's gradient."""

    @staticmethod
    def forward(ctx, x, y):
        ctx.save_for_backward(x, y)
        return x * y

    @staticmethod
    def backward(ctx, grad):
        x, y = ctx.saved_tensors
        grad_y = grad * x
        grad_y[3] += 1.0
        return grad * y, grad_y


def xy(dtype=f64):
    g = torch.Generator().manual_seed(0)
    return {name: torch.randn(6, generator=g, dtype=dtype, requires_grad=True) for name in ("x", "y")}


def test_step_size_and_threshold_follow_the_rule():
    # h = eps^(1/3): truncation h^2 meets rounding eps / h
    assert step_size(f64) == pytest.approx(2.0 ** (-52 / 3)) and step_size(f64) == pytest.approx(6.06e-6, rel=1e-3)
    assert step_size(f32) == pytest.approx(2.0 ** (-23 / 3)) and step_size(f32) == pytest.approx(4.92e-3, rel=1e-3)
    assert (threshold(f64), threshold(f32)) == (1e-7, 1e-3)
    with pytest.raises(ValueError, match="float64 or float32"):
        step_size(torch.bfloat16)


def test_centred_difference_equals_its_exact_value():
    # f = r0 sum x^3: the centred difference is r0 (3 x^2 + h^2) exactly, truncation h^2 f''' / 6 with f''' = 6
    x = torch.tensor([0.3, -0.7, 0.5], dtype=f64, requires_grad=True)
    h = 0.1
    report = gradcheck(lambda x: (x**3).sum(), [x], h=h)
    (check,) = report.tensors
    i = check.worst_index
    assert check.analytic / check.numeric == pytest.approx(
        3 * x[i].item() ** 2 / (3 * x[i].item() ** 2 + h**2), rel=1e-12
    )
    # O(h^2): the error is exactly 4x smaller at h / 2, which names the cause
    assert not report.passed and check.cause == "step too large"
    assert report.details["error"] / report.details["error_half_h"] == pytest.approx(4.0, rel=1e-6)
    assert report.likely_cause.startswith("step too large")
    assert torch.equal(x.detach(), torch.tensor([0.3, -0.7, 0.5], dtype=f64))  # restored bit for bit


def test_agrees_with_torch_gradcheck_on_correct_and_wrong_backwards():
    inputs = xy()
    good = [lambda x, y: x * y.tanh(), lambda x, y: torch.softmax(x * y, 0), lambda x, y: (x - y).pow(2).sum().sqrt()]
    for fn in good:
        report = gradcheck(fn, inputs)
        assert report.passed and torch.autograd.gradcheck(fn, (inputs["x"], inputs["y"]))
    assert not torch.autograd.gradcheck(MulWrongInY.apply, (inputs["x"], inputs["y"]), raise_exception=False)
    assert not gradcheck(lambda x, y: MulWrongInY.apply(x, y), inputs).passed


@pytest.mark.parametrize("name", ["loss/head-chunked", "rope/documents", "lora/dora"])
def test_agrees_with_torch_gradcheck_on_project_ops(name):
    case = next(op for op in OPS if op.name == name).build(f64)
    assert gradcheck(case.fn, case.inputs).passed
    assert torch.autograd.gradcheck(case.fn, tuple(case.inputs.values()))


def test_names_the_input_with_a_backward_bug():
    report = gradcheck(lambda x, y: MulWrongInY.apply(x, y), xy())
    x, y = report.tensors
    assert (x.name, x.passed, x.max_rel_error < 1e-9) == ("x", True, True)
    assert (y.name, y.passed, y.worst_index, y.cause) == ("y", False, (3,), "backward bug")
    assert y.analytic - y.numeric == pytest.approx(1.0, rel=1e-6)  # the bug's +1
    assert report.likely_cause.startswith("backward bug in one parameter type: the gradient of y ")
    assert "while x agree" in report.likely_cause


def test_kink_at_relu_zero_and_moving_away():
    x = torch.tensor([0.4, -0.3, 0.0, 0.8, -0.6], dtype=f64, requires_grad=True)
    report = gradcheck(torch.relu, [x])
    assert not report.passed and report.worst.worst_index == (2,) and report.worst.cause == "kink"
    assert report.likely_cause.startswith("kink: the one-sided slopes at input0[2]")
    with torch.no_grad():
        x[2] = 0.5  # away from the kink by far more than h
    assert gradcheck(torch.relu, [x]).passed


def test_float32_step_too_large_too_small_and_the_rule():
    x = torch.linspace(-1.5, 1.5, 16, dtype=f32).requires_grad_(True)
    errors = {}
    for h in (0.3, step_size(f32), 1e-6):
        report = gradcheck(torch.sin, [x], h=h)
        errors[h] = report.worst
        assert report.h == h and report.threshold == 1e-3
        if h == step_size(f32):
            assert report.passed
        else:
            assert not report.passed
            expected = "step too large" if h == 0.3 else "step too small"
            assert report.worst.cause == expected and report.likely_cause.startswith(expected)
    # the centred difference of sin is cos(x) sin(h) / h: truncation 1 - sin(h) / h ~ h^2 / 6
    assert errors[0.3].numeric / errors[0.3].analytic == pytest.approx(math.sin(0.3) / 0.3, rel=1e-4)
    # the rule's step has the smallest error
    assert errors[step_size(f32)].max_rel_error < min(errors[0.3].max_rel_error, errors[1e-6].max_rel_error)


def test_loss_nearly_flat():
    x = torch.linspace(-1, 1, 8, dtype=f32).requires_grad_(True)
    report = gradcheck(lambda x: 1e6 + 1e-9 * x, [x])  # the slope is lost in the offset's rounding
    assert not report.passed and report.worst.cause == "loss nearly flat"
    assert report.likely_cause.startswith("loss nearly flat (linear) in input0")
    assert gradcheck(lambda x: 1e-9 * x, [x]).passed  # linear without the offset: exact


def test_module_path_checks_named_parameters_and_restores_them():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[2].bias.requires_grad_(False)  # frozen: not checked
    x = torch.randn(5, 3, dtype=f64, requires_grad=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = gradcheck(model, [x])
    assert report.passed
    assert [t.name for t in report.tensors] == ["input0", "0.weight", "0.bias", "2.weight"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.linspace(0.5, 1.5, 6, dtype=f64))

        def forward(self, x):
            return MulWrongInY.apply(x, self.weight)

    report = gradcheck(Scale(), {"x": xy()["x"]})
    assert [(t.name, t.passed) for t in report.tensors] == [("x", True), ("weight", False)]
    assert "backward bug in one parameter type: the gradient of weight" in report.likely_cause


def test_sampling_is_seeded_and_bad_functions_are_refused():
    layer, inputs = nn.Linear(64, 64).double(), [torch.randn(2, 64, dtype=f64)]
    report = gradcheck(layer, inputs, max_entries_per_tensor=16)
    assert [(t.name, t.checked) for t in report.tensors] == [("weight", 16), ("bias", 16)] and report.passed
    assert gradcheck(layer, inputs, max_entries_per_tensor=16).to_dict() == report.to_dict()  # seeded
    x = torch.randn(4, dtype=f64, requires_grad=True)
    with pytest.raises(ValueError, match="not deterministic"):
        gradcheck(lambda x: nn.functional.dropout(x, 0.5), [x])
    with pytest.raises(RuntimeError, match="wrote to its inputs"):
        gradcheck(lambda x: x.data.mul_(2), [x])
    threads = torch.get_num_threads()
    gradcheck(torch.sin, [x], threads=threads + 1)
    assert torch.get_num_threads() == threads  # restored
    with pytest.raises(ValueError, match="nothing to check"):
        gradcheck(torch.sin, [x.detach()])


@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
def test_every_custom_op_passes_in_float64(op: CustomOp):
    row = check_op(op, f64)
    if row["result"] == "skip":
        assert op.name.startswith("attention/") and "CUDA" in row["reason"]
        pytest.skip(row["reason"])
    report = row["report"]
    assert row["result"] == "pass", report["likely_cause"]
    assert report["tensors"] and all(t["max_rel_error"] < 1e-7 for t in report["tensors"])


def test_dora_at_a_random_point_fails_in_a_and_b_by_design():
    # DoRA detaches its row norm (Liu et al. sec. 4.3): only A and B see the difference
    case = custom_ops.dora(f64, stationary=False)
    report = gradcheck(case.fn, case.inputs)
    assert {t.name: t.passed for t in report.tensors} == {
        "x": True, "bias": True, "lora_A.q": False, "lora_B.q": False, "lora_magnitude.q": True,
    }  # fmt: skip
    assert report.likely_cause.startswith("backward bug in one parameter type")


def test_loss_scaling_check_catches_a_missing_unscale(monkeypatch):
    monkeypatch.setattr(TorchStrategy, "unscale_gradients", lambda self: None)  # gradients stay x 2^16
    case = custom_ops.loss_scaling(f64)
    report = gradcheck(case.fn, case.inputs, backward=case.backward, max_entries_per_tensor=4)
    assert not any(t.passed for t in report.tensors if t.largest_gradient > 0)
    ratios = [t.analytic / t.numeric for t in report.tensors if abs(t.numeric) > 1e-4]
    assert len(ratios) > 10 and ratios == pytest.approx([2.0**16] * len(ratios), rel=1e-6)
    assert report.likely_cause.startswith("backward bug: every checked tensor")


def test_cli_prints_the_table_and_exit_codes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "gradcheck.json"
    assert diagnose(["gradcheck", "--only", "norm", "attention/flash", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[0].split()
    assert header[:3] == ["op", "tensors", "worst"] and header[-2:] == ["likely", "cause"]
    rows = {line.split()[0]: line.split() for line in printed.splitlines()[2:] if line}
    assert rows["norm/layernorm"][1] == "3" and "pass" in rows["norm/layernorm"]
    assert "skip    needs a CUDA device" in next(line for line in printed.splitlines() if "attention/flash" in line)
    results = json.loads(out.read_text())
    assert [r["op"] for r in results] == ["attention/flash", "norm/layernorm", "norm/rmsnorm"]

    broken = CustomOp(
        "broken/mul", "x * y, wrong gradient at y[3]", lambda d: Case(lambda x, y: MulWrongInY.apply(x, y), xy(d))
    )
    monkeypatch.setattr(custom_ops, "OPS", [*OPS, broken])
    assert diagnose(["gradcheck", "--only", "broken", "rope/positions"]) == 1
    printed = capsys.readouterr().out
    broken_row = next(line for line in printed.splitlines() if line.startswith("broken/mul"))
    assert "y[3]" in broken_row and " FAIL " in broken_row and broken_row.endswith("backward bug in one parameter type")
    assert " pass " in next(line for line in printed.splitlines() if line.startswith("rope/positions"))
    assert "broken/mul: backward bug in one parameter type: the gradient of y" in printed
