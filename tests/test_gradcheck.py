"""Numerical checks (float64) of attention, the loss and the norms: values against explicit formulas,
gradients against centred differences (trainer.diagnostics.gradcheck, appendix D of the lesson)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from trainer.diagnostics import gradcheck
from trainer.model.gpt import RMSNorm, causal_attention, rms_norm
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum

f64 = torch.float64


def reference_attention(q, k, v):
    """softmax(q k^T / sqrt(hd) + causal mask) v, with kv head j serving query heads j*r..j*r+r-1."""
    repeat = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
    T = q.size(-2)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, nh, T, T)
    future = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    scores = scores.masked_fill(future, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


def qkv(n_kv: int, seed: int = 0, T: int = 4):
    """q (1, 4, T, 4), k and v (1, n_kv, T, 4): small, since gradcheck perturbs every element."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, T, 4, dtype=f64, generator=g, requires_grad=True)
    k = torch.randn(1, n_kv, T, 4, dtype=f64, generator=g, requires_grad=True)
    v = torch.randn(1, n_kv, T, 4, dtype=f64, generator=g, requires_grad=True)
    return q, k, v


@pytest.mark.parametrize("backend", ["math", "auto"])
@pytest.mark.parametrize("n_kv", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_attention_matches_reference_and_gradcheck(backend, n_kv):
    q, k, v = qkv(n_kv)
    torch.testing.assert_close(causal_attention(q, k, v, backend), reference_attention(q, k, v), rtol=1e-12, atol=1e-12)
    report = gradcheck(lambda q, k, v: causal_attention(q, k, v, backend), {"q": q, "k": k, "v": v})
    assert report.passed, report
    assert [t.checked for t in report.tensors] == [64, 16 * n_kv, 16 * n_kv]  # every entry


@pytest.mark.parametrize("n_kv", [4, 2])
def test_attention_future_positions_get_no_gradient(n_kv):
    q, k, v = qkv(n_kv, seed=1, T=6)
    out = causal_attention(q, k, v, "math")
    t = 2
    dq, dk, dv = torch.autograd.grad(out[:, :, t].sum(), (q, k, v))
    assert torch.all(dk[:, :, t + 1 :] == 0) and torch.all(dv[:, :, t + 1 :] == 0)
    assert torch.all(dq[:, :, t + 1 :] == 0)
    assert dk[:, :, : t + 1].abs().sum() > 0 and dv[:, :, : t + 1].abs().sum() > 0
    # perturbing a future key / value leaves every earlier output unchanged
    with torch.no_grad():
        k2, v2 = k.clone(), v.clone()
        k2[:, :, 4] += 3.0
        v2[:, :, 4] -= 5.0
        out2 = causal_attention(q, k2, v2, "math")
    assert torch.equal(out2[:, :, :4], out[:, :, :4].detach())
    assert (out2[:, :, 4:] - out[:, :, 4:]).abs().max() > 1e-3


def logits_and_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 7, generator=g)
    targets = torch.tensor([[1, IGNORE_INDEX, 6, 0], [IGNORE_INDEX, 3, 3, IGNORE_INDEX]])
    return logits, targets


def test_cross_entropy_sum_value_and_gradient():
    logits, targets = logits_and_targets()
    logits.requires_grad_(True)
    loss = cross_entropy_sum(logits, targets)
    valid = targets != IGNORE_INDEX
    log_probs = logits.detach().log_softmax(-1)
    picked = log_probs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    expected = -(picked * valid).sum()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-6)
    (grad,) = torch.autograd.grad(loss, logits)
    # d loss / d logits = softmax - onehot at valid positions, 0 where the target is ignored
    onehot = torch.nn.functional.one_hot(targets.clamp(min=0), 7).float()
    expected_grad = (log_probs.exp() - onehot) * valid[..., None]
    torch.testing.assert_close(grad, expected_grad, rtol=1e-6, atol=1e-6)
    assert torch.all(grad[~valid] == 0)


def test_cross_entropy_sum_ignores_masked_targets():
    logits, targets = logits_and_targets()
    noisy = logits.clone()
    noisy[targets == IGNORE_INDEX] += 100.0  # huge logits at ignored positions change nothing
    torch.testing.assert_close(cross_entropy_sum(noisy, targets), cross_entropy_sum(logits, targets))


def test_cross_entropy_sum_gradcheck_float64():
    logits, targets = logits_and_targets()
    logits = logits.to(f64).requires_grad_(True)
    report = gradcheck(lambda x: cross_entropy_sum(x, targets), [logits])
    assert report.passed, report


def test_layernorm_value_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    norm = nn.LayerNorm(6, eps=1e-5).to(f64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g, dtype=f64))
        norm.bias.copy_(torch.randn(6, generator=g, dtype=f64))
    x = torch.randn(3, 4, 6, dtype=f64, generator=g, requires_grad=True)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    report = gradcheck(norm, [x])
    assert report.passed, report
    assert [t.name for t in report.tensors] == ["input0", "weight", "bias"]


def test_rmsnorm_value_and_gradcheck():
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(6, eps=1e-6).to(f64)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(6, generator=g, dtype=f64))
    x = torch.randn(3, 4, 6, dtype=f64, generator=g, requires_grad=True)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda x, w: rms_norm(x, w, 1e-6), {"x": x, "w": norm.weight}).passed
    # bf16 model: the statistics are computed in fp32, the output is bf16
    xb = x.detach().to(torch.bfloat16)
    out = RMSNorm(6, eps=1e-6).to(torch.bfloat16)(xb)
    assert out.dtype == torch.bfloat16
    xf = xb.float()
    torch.testing.assert_close(out, (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).bfloat16())
