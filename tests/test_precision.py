"""Mixed precision: fp16 underflow and loss scaling, skipped overflow steps, bf16 close to fp32."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from helpers import build

from trainer.__main__ import compose_config
from trainer.config import (
    Config,
    ConfigError,
    ModelConfig,
    OptimConfig,
    PrecisionConfig,
    TrainConfig,
)
from trainer.loop import train
from trainer.precision import DynamicLossScaler
from trainer.step import train_step

MODEL = ModelConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=32)
TINY = 1e-7  # shrinks the loss so every gradient sits below fp16's smallest subnormal (~6e-8)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)


def single_device(precision: PrecisionConfig | None = None, optim: OptimConfig | None = None, max_steps: int = 1):
    """parallel=none on the CPU, built as the loop builds it."""
    train_cfg = TrainConfig(max_steps=max_steps, device="cpu", seq_len=16)
    return build(
        Config(model=MODEL, precision=precision or PrecisionConfig(), optim=optim or OptimConfig(), train=train_cfg)
    )


def gradients(precision: PrecisionConfig) -> dict[str, torch.Tensor]:
    """Gradients of TINY * mean token loss through the strategy's own precision path."""
    strategy = single_device(precision)
    x, y = batch()
    with strategy.micro_step(is_last=True):
        loss = strategy.model(x, targets=y) / y.numel() * TINY
        strategy.backward(loss)
    strategy.unscale_gradients()
    return {n: p.grad.clone() for n, p in strategy.model.named_parameters()}


def relative_error(got: dict, want: dict) -> float:
    num = sum((got[n] - want[n]).pow(2).sum() for n in want)
    return float((num / sum(w.pow(2).sum() for w in want.values())).sqrt())


def test_fp16_without_scaling_loses_small_gradients_and_scaling_recovers_them() -> None:
    reference = gradients(PrecisionConfig(dtype="fp32"))
    assert max(g.abs().max() for g in reference.values()) < 6e-8  # all below fp16's range

    unscaled = gradients(PrecisionConfig(dtype="fp16", initial_scale=1.0, growth_interval=10**6))
    zeros = sum(int((g == 0).sum()) for g in unscaled.values()) / sum(g.numel() for g in unscaled.values())
    assert zeros > 0.9  # nearly every gradient underflowed to exactly zero
    assert relative_error(unscaled, reference) > 0.5

    # At the default scale 2**16 these gradients (~1e-10) land at ~6e-6, in fp16's subnormal range
    # (below 6.1e-5), where rounding costs ~1% (1.0-1.1% over init seeds 0-5); at 2**24 they are
    # normal fp16 numbers and only fp16's 11-bit mantissa remains (~0.05%).
    scaled = gradients(PrecisionConfig(dtype="fp16", initial_scale=2.0**16))
    assert relative_error(scaled, reference) < 2e-2  # fp16 rounding, nothing lost
    normal = gradients(PrecisionConfig(dtype="fp16", initial_scale=2.0**24))
    assert relative_error(normal, reference) < 1e-3


def test_an_inf_gradient_skips_the_step_and_halves_the_scale() -> None:
    strategy = single_device(PrecisionConfig(dtype="fp16"), OptimConfig(warmup_steps=0), max_steps=10)
    x, y = batch()

    def step(inject_inf: bool) -> bool:
        weight = strategy.model.embed.wte.weight
        hook = weight.register_hook(poison((3, 5), float("inf"))) if inject_inf else None
        result = train_step(strategy, x, y, accum_steps=1, clip_grad_norm=1.0)
        if hook is not None:
            hook.remove()
        assert result.non_finite == inject_inf
        return result.stepped

    assert step(inject_inf=False)  # one real step, so the optimizer has state to protect
    weights = copy.deepcopy(strategy.model.state_dict())
    optimizer_state = copy.deepcopy(strategy.optimizer.state_dict())
    lr, scale = strategy.scheduler.get_last_lr(), strategy.loss_scale()

    assert not step(inject_inf=True)
    assert strategy.loss_scale() == scale / 2
    assert strategy.scheduler.get_last_lr() == lr
    assert all(p.grad is None for p in strategy.model.parameters())
    for name, tensor in strategy.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    after = strategy.optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)

    assert step(inject_inf=False)  # and training goes on
    assert not torch.equal(strategy.model.embed.wte.weight, weights["embed.wte.weight"])


def test_fp32_nan_gradient_is_skipped_too() -> None:
    strategy = single_device()
    x, y = batch()
    strategy.model.blocks[0].mlp.c_fc.weight.register_hook(poison((0, 0), float("nan")))
    before = copy.deepcopy(strategy.model.state_dict())
    result = train_step(strategy, x, y, accum_steps=1, clip_grad_norm=1.0)
    assert not result.stepped and result.non_finite and math.isnan(result.grad_norm)
    assert all(torch.equal(v, before[k]) for k, v in strategy.model.state_dict().items())


def test_a_deferred_step_decides_to_skip_on_the_device() -> None:
    """defer=True (no host sync: fused AdamW reads the non-finite flag itself): an inf gradient
    leaves weights and AdamW's state (its step count too) untouched, only the schedule moves on;
    finite deferred steps give bitwise the synchronous path's weights."""
    optim = OptimConfig(warmup_steps=2)
    deferred, synchronous = single_device(optim=optim, max_steps=10), single_device(optim=optim, max_steps=10)
    assert deferred.steps_without_sync and not single_device(PrecisionConfig(dtype="fp16")).steps_without_sync
    x, y = batch()
    for _ in range(2):
        result = train_step(deferred, x, y, accum_steps=1, clip_grad_norm=0.5, defer=True)
        assert result.readback is not None and math.isnan(result.loss)  # nothing read back yet
        assert result.settle().stepped
        want = train_step(synchronous, x, y, accum_steps=1, clip_grad_norm=0.5)
        assert (result.loss, result.grad_norm, result.target_tokens) == (want.loss, want.grad_norm, want.target_tokens)
    for name, tensor in synchronous.model.state_dict().items():
        assert torch.equal(deferred.model.state_dict()[name], tensor), name
    weights = copy.deepcopy(deferred.model.state_dict())
    optimizer_state = copy.deepcopy(deferred.optimizer.state_dict())
    deferred.model.blocks[0].mlp.c_fc.weight.register_hook(poison((0, 0), float("inf")))
    result = train_step(deferred, x, y, accum_steps=1, clip_grad_norm=0.5, defer=True).settle()
    assert not result.stepped and result.non_finite and math.isinf(result.grad_norm)
    for name, tensor in deferred.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    after = deferred.optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            assert torch.equal(after["state"][index][key], value), (index, key)
    assert deferred.scheduler.last_epoch == synchronous.scheduler.last_epoch + 1  # the schedule moved on


def poison(index: tuple[int, int], value: float):
    """A gradient hook that sets one entry of a parameter's gradient to value (inf / NaN)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        grad[index] = value
        return grad

    return hook


def test_scaler_grows_after_a_clean_interval_and_backs_off_on_overflow() -> None:
    scaler = DynamicLossScaler(PrecisionConfig(dtype="fp16", initial_scale=8.0, growth_interval=3))
    for _ in range(2):
        scaler.update(found_non_finite=False)
    assert scaler.scale == 8.0
    scaler.update(found_non_finite=False)
    assert scaler.scale == 16.0
    scaler.update(found_non_finite=True)
    assert scaler.scale == 8.0 and scaler.clean_steps == 0
    restored = DynamicLossScaler(PrecisionConfig(dtype="fp16"))
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == {"scale": 8.0, "clean_steps": 0}


def run_losses(tmp_path: Path, name: str, *overrides: str) -> list[float]:
    import json

    cfg, _ = compose_config(
        [
            "experiment=synthetic",
            "logger.wandb=false",
            "logger.progress_bar=false",
            "model.n_layer=1",
            "model.n_embd=64",
            "train.seq_len=32",
            "train.micro_batch_size=8",
            "train.max_steps=40",
            "train.log_interval=10",
            "train.eval_interval=40",
            "train.sample_tokens=0",
            "optim.lr=3e-3",
            f"data.cache_dir={tmp_path / 'cache'}",
            *overrides,
        ]
    )
    train(cfg, tmp_path / name)
    return [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.heavy
def test_bf16_and_fp16_train_like_fp32(tmp_path: Path) -> None:
    fp32 = run_losses(tmp_path, "fp32")
    bf16 = run_losses(tmp_path, "bf16", "precision=bf16")
    fp16 = run_losses(tmp_path, "fp16", "precision=fp16")
    assert fp32[-1] < 3.44 - 0.3  # it learned the chain: well below the unigram entropy (3.44 nats)
    assert bf16[-1] == pytest.approx(fp32[-1], abs=0.05)
    assert fp16[-1] == pytest.approx(fp32[-1], abs=0.02)


def test_bad_precision_input_is_one_line(tmp_path: Path) -> None:
    from trainer.__main__ import preflight

    with pytest.raises(ConfigError, match="precision=fp16 with parallel=zero2 needs a GPU"):
        preflight(["parallel=zero2", "precision=fp16"])
    with pytest.raises(ConfigError, match="precision.loss_scaling=true needs precision=bf16 or fp16"):
        preflight(["precision.loss_scaling=true"])
    cfg, _ = compose_config(
        [
            "experiment=synthetic",
            "logger.wandb=false",
            "model.attention_backend=flash",
            "train.max_steps=1",
            f"data.cache_dir={tmp_path / 'cache'}",
        ]
    )
    with pytest.raises(ConfigError, match="model.attention_backend=flash needs a CUDA device"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
