"""The chunked head + cross-entropy (`model.loss_chunk_size > 0`) equals the plain path.

linear_cross_entropy_sum(h, W, y, chunk) against cross_entropy_sum(F.linear(h, W), y): the loss
and both gradients (fp32 and fp64, ignored targets, chunk sizes that do and do not divide the
token count), gradcheck, bf16 and autocast, which gradients are produced, that no (N, V) tensor
is ever allocated; then whole GPTs (tied and untied head) and, on two gloo ranks, ZeRO-3 with
every parameter partitioned. This file is also that ZeRO-3 case's torchrun worker.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import GPT2_LIKE, LLAMA_LIKE, torchrun
from torch.autograd import gradcheck
from torch.utils._python_dispatch import TorchDispatchMode

import trainer.model.gpt as gpt_module
from trainer.config import ModelConfig
from trainer.model import GPT
from trainer.model.loss import IGNORE_INDEX, cross_entropy_sum, linear_cross_entropy_sum

REPO = Path(__file__).resolve().parent.parent
B, T, C, V = 2, 19, 16, 97  # N = 38 tokens: 7 does not divide it
TOLERANCES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
}


def inputs(dtype: torch.dtype = torch.float32, seed: int = 0):
    """hidden (B, T, C), weight (V, C), targets (B, T) with about a quarter IGNORE_INDEX."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, C, generator=g, dtype=dtype)
    weight = torch.randn(V, C, generator=g, dtype=dtype) * 0.5
    targets = torch.randint(0, V, (B, T), generator=g)
    targets[torch.rand(B, T, generator=g) < 0.25] = IGNORE_INDEX
    targets[0, 0] = IGNORE_INDEX
    return hidden, weight, targets


def loss_and_grads(fn, hidden, weight, targets, scale: float = 0.37):
    """fn's loss, and d(scale * loss)/d(hidden, weight): a scale != 1 checks grad_output is used."""
    hidden = hidden.detach().requires_grad_()
    weight = weight.detach().requires_grad_()
    loss = fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def plain(hidden, weight, targets):
    return cross_entropy_sum(F.linear(hidden, weight), targets)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_size", [1, 7, B * T, 100])
def test_fused_loss_and_gradients_equal_the_plain_path(dtype, chunk_size):
    hidden, weight, targets = inputs(dtype)
    want = loss_and_grads(plain, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, y: linear_cross_entropy_sum(h, w, y, chunk_size), hidden, weight, targets)
    assert got[0].dtype == want[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].shape == (B, T, C) and got[1].dtype == dtype and got[2].dtype == dtype
    assert want[0] > 100  # ~29 valid targets at ~log(97) + spread each: a real sum, not a mean
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, want, strict=True):
        torch.testing.assert_close(a, b, **TOLERANCES[dtype], msg=lambda m, n=name: f"{n}: {m}")
    # ignored positions get exactly no gradient
    assert (got[1][targets == IGNORE_INDEX] == 0).all()


def test_flat_hidden_and_all_targets_ignored():
    hidden, weight, targets = inputs()
    flat = linear_cross_entropy_sum(hidden.reshape(-1, C), weight, targets.reshape(-1), 5)
    torch.testing.assert_close(flat, plain(hidden, weight, targets), rtol=1e-5, atol=1e-6)
    loss, d_hidden, d_weight = loss_and_grads(
        lambda h, w, y: linear_cross_entropy_sum(h, w, y, 5),
        hidden,
        weight,
        torch.full_like(targets, IGNORE_INDEX),
    )
    assert loss.item() == 0.0 and not d_hidden.any() and not d_weight.any()


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([[1, IGNORE_INDEX, 5], [0, 2, 2], [IGNORE_INDEX, 3, 4]])
    assert gradcheck(lambda h, w: linear_cross_entropy_sum(h, w, targets, 4), (hidden, weight))


def test_second_backward_with_retained_graph_gives_the_same_gradients():
    """Backward scales the stored gradients in place only when the graph is not kept."""
    hidden, weight, targets = inputs()
    weight.requires_grad_()
    loss = linear_cross_entropy_sum(hidden, weight, targets, 8)
    first = torch.autograd.grad(loss * 3.0, weight, retain_graph=True)[0]
    second = torch.autograd.grad(loss * 3.0, weight)[0]
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(second, loss_and_grads(plain, hidden, weight, targets, scale=3.0)[2])


def test_only_the_gradients_asked_for():
    hidden, weight, targets = inputs()
    want = plain(hidden, weight, targets)
    h = hidden.clone().requires_grad_()
    loss = linear_cross_entropy_sum(h, weight, targets, 7)  # weight frozen (e.g. LoRA)
    loss.backward()
    assert h.grad is not None and weight.grad is None
    w = weight.clone().requires_grad_()
    loss_w = linear_cross_entropy_sum(hidden, w, targets, 7)
    assert torch.autograd.grad(loss_w, (w,))[0].shape == (V, C)
    with torch.no_grad():  # evaluation: no gradients computed, no graph
        no_grad = linear_cross_entropy_sum(h, w, targets, 7)
    assert no_grad.grad_fn is None
    for value in (loss, loss_w, no_grad):
        torch.testing.assert_close(value.detach(), want, rtol=1e-5, atol=1e-6)


def test_bf16_inputs_close_to_fp32():
    hidden, weight, targets = inputs()
    want = loss_and_grads(plain, hidden, weight, targets)
    got = loss_and_grads(
        lambda h, w, y: linear_cross_entropy_sum(h, w, y, 7),
        hidden.bfloat16(),
        weight.bfloat16(),
        targets,
    )
    assert got[0].dtype == torch.float32  # softmax and loss in fp32
    assert got[1].dtype == got[2].dtype == torch.bfloat16  # gradients in the inputs' dtype
    torch.testing.assert_close(got[0], want[0], rtol=1e-2, atol=0)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert (a.float() - b).norm() / b.norm() < 2e-2


def test_autocast_matches_the_plain_path_under_autocast():
    """fp32 parameters, bf16 autocast: bf16 matmuls, fp32 softmax, fp32 gradients, as F.linear."""
    hidden, weight, targets = inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = loss_and_grads(plain, hidden, weight, targets)
        got = loss_and_grads(lambda h, w, y: linear_cross_entropy_sum(h, w, y, 7), hidden, weight, targets)
    assert got[0].dtype == torch.float32 and got[2].dtype == torch.float32
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=0)  # same bf16 logits
    # Both round d logits to bf16 for the matmuls, the plain path after scaling by grad_output.
    for a, b in zip(got[1:], want[1:], strict=True):
        assert (a - b).norm() / b.norm() < 1e-2
    exact = loss_and_grads(plain, hidden, weight, targets)
    assert (got[0] - exact[0]).abs() > 1e-4  # autocast really lowered the matmul's precision


class LargestAllocation(TorchDispatchMode):
    """Records the largest number of elements of any tensor an op returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_all_the_logits_is_allocated():
    n, c, v, chunk = 64, 8, 1000, 8  # N x V = 64000 elements; one chunk 8000 = V x C
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, c, generator=g, requires_grad=True)
    weight = torch.randn(v, c, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    with LargestAllocation() as fused:
        linear_cross_entropy_sum(hidden, weight, targets, chunk).backward()
    with LargestAllocation() as unfused:
        plain(hidden, weight, targets).backward()
    assert fused.largest == v * c  # the weight gradient; a chunk of logits is as large
    assert unfused.largest == n * v  # so the check can fail: the plain path allocates them all


@pytest.mark.parametrize("kwargs", [GPT2_LIKE, LLAMA_LIKE], ids=["tied", "untied"])
def test_gpt_with_loss_chunks_gives_the_same_loss_and_every_gradient(kwargs):
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 97, (3, 13), generator=g)
    targets = torch.randint(0, 97, (3, 13), generator=g)
    targets[0, :5] = IGNORE_INDEX
    results = {}
    for chunk in (0, 10):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**kwargs, loss_chunk_size=chunk))
        loss = model(idx, targets=targets)
        (loss / 34).backward()  # as the loop: divided by a target count
        with torch.no_grad():
            eval_loss = model.eval()(idx, targets=targets)
        assert model(idx).shape == (3, 13, 97)  # without targets: logits, whatever the chunk size
        results[chunk] = loss.detach(), eval_loss, {n: p.grad for n, p in model.named_parameters()}
    (loss, eval_loss, grads), (want, want_eval, want_grads) = results[10], results[0]
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(eval_loss, want_eval, rtol=1e-5, atol=1e-5)
    assert grads.keys() == want_grads.keys() and ("head.weight" in grads) == (kwargs is LLAMA_LIKE)
    for name, grad in want_grads.items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_loss_chunk_size_null_chunks_large_vocabularies_only(monkeypatch):
    """The auto rule (model.loss_chunk_size=null): full logits for a byte vocabulary, chunks from 2048 rows."""
    assert ModelConfig(vocab_size=260).loss_chunk == 0  # padded to 320: below the threshold
    assert ModelConfig(vocab_size=2000).loss_chunk == 1024  # padded to 2048
    assert ModelConfig(vocab_size=50257, vocab_multiple=1).loss_chunk == 1024
    assert ModelConfig(vocab_size=50257, loss_chunk_size=0).loss_chunk == 0  # an explicit choice wins
    assert ModelConfig(vocab_size=50257, loss_chunk_size=64).loss_chunk == 64
    chunks = []
    fused = gpt_module.linear_cross_entropy_sum
    monkeypatch.setattr(gpt_module, "linear_cross_entropy_sum", lambda *a: chunks.append(a[3]) or fused(*a))
    GPT(ModelConfig(**{**GPT2_LIKE, "vocab_size": 2000}))(
        torch.zeros(1, 4, dtype=torch.long), targets=torch.ones(1, 4, dtype=torch.long)
    )
    assert chunks == [1024]  # the model took the fused path, in the auto chunk size


# -- ZeRO-3 with every parameter partitioned: the head weight read in GPT.forward is gathered ----


@pytest.mark.heavy
def test_zero3_partitioned_untied_and_tied_heads_match_one_process(tmp_path):
    """DeepSpeed gathers `head.weight` / `embed.wte.weight` when GPT.forward reads them outside
    their module (it registers them as external parameters of GPT), so the fused loss needs no
    `self.head(...)` call. stage3_param_persistence_threshold=0 partitions even these tiny ones."""
    pytest.importorskip("deepspeed")
    out, ds_config = tmp_path / "zero3.pt", tmp_path / "ds.json"
    ds_config.write_text('{"zero_optimization": {"stage3_param_persistence_threshold": 0}}')
    result = torchrun(__file__, str(out), str(ds_config), cwd=REPO)  # OMP_NUM_THREADS=1
    assert result.returncode == 0, result.stderr[-4000:]
    got = torch.load(out, weights_only=True)
    import dist_worker

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers
    try:
        want_all = {tie: one_step("none", tie, ds_config) for tie in (True, False)}
    finally:
        torch.set_num_threads(threads)
    # dist_worker's step is linear in the gradient (Adam's eps = 1): weights differ by the gradient's
    # fp32 rounding, bounded by dist_worker.STEP_RTOL (the loss chunks add no longer sum)
    rtol = dist_worker.STEP_RTOL
    for tie in (True, False):
        want = want_all[tie]
        assert got[tie]["partitioned"], "the head weight was not partitioned: nothing was tested"
        assert got[tie]["norm"] == pytest.approx(want["norm"], rel=rtol)
        for name, tensor in want["weights"].items():
            gap = (got[tie]["weights"][name] - tensor).norm() / tensor.norm()
            assert gap < rtol, f"tie={tie} {name}: relative gap {gap:.2e} (bound {rtol:.2e})"


def one_step(strategy_name: str, tie: bool, ds_config: Path) -> dict:
    """One clipped step of tests/dist_worker.py's masked batch with the fused loss (chunks of 5)."""
    import dist_worker
    from helpers import build, masked_global_batch, step_once

    from trainer.config import ParallelConfig

    model_cfg = dataclasses.replace(dist_worker.MODEL, tie_embeddings=tie, loss_chunk_size=5)
    cfg = dataclasses.replace(
        dist_worker.config("zero3"),
        model=model_cfg,
        parallel=ParallelConfig(
            strategy=strategy_name, deepspeed_config=str(ds_config) if strategy_name == "zero3" else None
        ),
    )
    strategy = build(cfg)
    head = strategy.unwrapped().embed.wte if tie else strategy.unwrapped().head
    partitioned = strategy_name != "none" and head.weight.ds_tensor.numel() < head.weight.ds_numel
    x, y = masked_global_batch()
    result = step_once(strategy, x, y, dist_worker.MICRO, dist_worker.CLIP, stats=False)
    return {"norm": result["norm"], "weights": result["weights"], "partitioned": partitioned}


if __name__ == "__main__":  # torchrun worker of the ZeRO-3 test: OUT.pt DS_CONFIG.json
    import torch.distributed as dist

    from trainer.parallel.dist import exit_process

    results = {tie: one_step("zero3", tie, Path(sys.argv[2])) for tie in (True, False)}
    if dist.get_rank() == 0:
        torch.save(results, sys.argv[1])
    dist.barrier()
    exit_process(0)  # as `python -m trainer` ends: no interpreter teardown under gloo's live threads
