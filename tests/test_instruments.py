"""diagnostics.noise_scale and diagnostics.sharpness inside training: the figures the loop logs
against autograd and exact Hessians, the config's refusals, and a resumed run continuing them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import QUICK, build, masked_global_batch, run_cli
from torch.func import functional_call

from trainer.config import Config, ConfigError, ModelConfig, OptimConfig, PrecisionConfig, TrainConfig
from trainer.diagnostics.instruments import Instruments, noise_scale_sample
from trainer.model.loss import IGNORE_INDEX
from trainer.preflight import check_run
from trainer.step import train_step

MODEL = ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=32, bias=False)


def config(**precision) -> Config:
    return Config(
        model=MODEL, precision=PrecisionConfig(**precision), optim=OptimConfig(lr=1e-2, warmup_steps=0),
        train=TrainConfig(micro_batch_size=2, grad_accum_steps=4, seq_len=16, max_steps=1),
    )  # fmt: skip


def test_a_loss_scaled_probe_reports_the_unscaled_gradients():
    """bf16 with the harness's loss scaler (2^16): the first micro-batch's gradient is read before
    unscaling, so the probe divides the scale out; the sample must equal fp32's within bf16 rounding."""
    x, y = masked_global_batch()
    samples = {}
    for name, precision in {"fp32": {}, "bf16-scaled": {"dtype": "bf16", "loss_scaling": True}}.items():
        result = train_step(build(config(**precision)), x, y, 4, 1.0, noise_probe=True)
        samples[name] = noise_scale_sample(*result.noise)
    (small, big, n_small, n_big), want = samples["bf16-scaled"], samples["fp32"]
    assert (n_small, n_big) == want[2:] == (4, 71)  # rows 0-1 keep 1 + 3 targets; all rows 71
    assert small == pytest.approx(want[0], rel=3e-2) and big == pytest.approx(want[1], rel=3e-2)
    assert small > big  # one micro-batch's mean gradient is noisier than the step's


def tiny_double_model_strategy():
    """A GPT small enough for its exact Hessian (140 parameters), in float64, math attention
    (SDPA's fused CPU kernel has no double backward)."""
    cfg = Config(
        model=ModelConfig(vocab_size=4, vocab_multiple=1, block_size=4, n_layer=1, n_head=1, n_embd=4,
                          intermediate_size=4, bias=False, attention_backend="math"),
        train=TrainConfig(micro_batch_size=2, seq_len=4),
    )  # fmt: skip
    cfg.diagnostics.sharpness.enabled, cfg.diagnostics.sharpness.iterations = True, 100
    cfg.diagnostics.sharpness.batch_size = 2
    strategy = build(cfg, seed=1)
    strategy.unwrapped().double()
    return cfg, strategy


class Held:
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def get_batch(self, rows):
        return self.x[rows], self.y[rows]


def test_sharpness_is_the_exact_top_eigenvalue_of_the_held_batch_hessian():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 4, (2, 4), generator=g), torch.randint(0, 4, (2, 4), generator=g)
    y[1, 2:] = IGNORE_INDEX  # masked targets: the loss is the mean over the 6 that count
    cfg, strategy = tiny_double_model_strategy()
    model = strategy.unwrapped()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])

    def loss(vector):
        params, start = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = vector[start : start + shape.numel()].view(shape)
            start += shape.numel()
        return functional_call(model.eval(), params, (x,), {"targets": y}) / 6

    exact = torch.linalg.eigvalsh(torch.autograd.functional.hessian(loss, flat))[-1].item()
    model.train()
    for method in ("double_backward", "finite_difference"):
        cfg.diagnostics.sharpness.method = method
        value, used = Instruments(cfg, strategy, Held(x, y)).sharpness()
        assert used == method
        assert value == pytest.approx(exact, rel=1e-3), method
    assert model.training  # measured in eval mode, handed back in train mode


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"noise_scale": True}, "train.grad_accum_steps=2 or more"),
        ({"noise_scale": True, "strategy": "zero2"}, "train.grad_accum_steps=2 or more"),  # zero: allowed, with accum
        ({"sharpness": True, "strategy": "zero3"}, "diagnostics.sharpness.enabled=true is available"),
    ],
)
def test_diagnostics_that_cannot_run_are_refused_in_one_line(overrides, message):
    cfg = Config()
    cfg.diagnostics.noise_scale = overrides.get("noise_scale", False)
    cfg.diagnostics.sharpness.enabled = overrides.get("sharpness", False)
    cfg.parallel.strategy = overrides.get("strategy", "none")
    with pytest.raises(ConfigError, match=message) as error:
        check_run(cfg, world_size=2 if cfg.parallel.strategy != "none" else 1)
    assert "\n" not in str(error.value)


def test_a_held_batch_larger_than_the_validation_split_is_refused():
    cfg = Config()
    cfg.diagnostics.sharpness.enabled, cfg.diagnostics.sharpness.batch_size = True, 5
    with pytest.raises(ConfigError, match="batch_size=5 is larger than the validation split \\(2 sequences\\)"):
        Instruments(cfg, None, Held(torch.zeros(2, 4), None))


@pytest.mark.parametrize("bad", ["diagnostics.sharpness.interval=0", "diagnostics.noise_scale_ema=1.0"])
def test_bad_intervals_fail_before_training(tmp_path, bad):
    result = run_cli(*QUICK, bad, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert result.returncode != 0 and bad.split("=")[0] in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow  # 10 s: two runs and a resume
def test_a_resumed_run_continues_the_noise_scale_and_sharpness_exactly(tmp_path):
    """4 steps straight vs 2 + resume + 2: the noise scale's EMAs live in the checkpoint, so step 4's
    figures are bitwise the same; sharpness rows only at its interval."""
    args = [*QUICK, "train.max_steps=4", "train.log_interval=1", "train.grad_accum_steps=2",
            "diagnostics.noise_scale=true", "diagnostics.sharpness.enabled=true",
            "diagnostics.sharpness.interval=2", "diagnostics.sharpness.iterations=3", "checkpoint.interval=2",
            f"data.cache_dir={tmp_path / 'cache'}"]  # fmt: skip
    rows = {}
    for name, extra in {
        "straight": [],
        "resumed": ["train.resume=" + str(tmp_path / "straight/checkpoints/step_00000002")],
    }.items():
        result = run_cli(*args, *extra, f"hydra.run.dir={tmp_path / name}", cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
        rows[name] = {
            r["step"]: r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
        }
    straight, resumed = rows["straight"], rows["resumed"]
    assert [s for s, r in straight.items() if "sharpness/lambda_max" in r] == [2, 4]
    for step in (3, 4):
        for key in ("noise_scale/b_simple", "noise_scale/grad_sq", "noise_scale/trace_sigma", "loss"):
            assert resumed[step][key] == straight[step][key], (step, key)
    assert resumed[4]["sharpness/lambda_max"] == straight[4]["sharpness/lambda_max"] > 0
    assert straight[4]["noise_scale/global_batch_tokens"] == straight[4]["global_batch"] * 32


def test_finite_differences_agree_with_double_backward_on_a_float32_gpt():
    """The finite-difference step scales with the parameters' RMS, not their norm: on a 0.4M-parameter
    fp32 GPT a step of 4.9e-3 (1 + |θ|) left the quadratic region and read λmax ~45% low."""
    cfg = Config(model=ModelConfig(vocab_size=257, n_layer=2, attention_backend="math"), train=TrainConfig(seq_len=64))
    cfg.diagnostics.sharpness.enabled, cfg.diagnostics.sharpness.iterations = True, 40
    cfg.diagnostics.sharpness.batch_size = 2
    g = torch.Generator().manual_seed(0)
    held = Held(torch.randint(0, 257, (2, 64), generator=g), torch.randint(0, 257, (2, 64), generator=g))
    strategy = build(cfg)
    values = {}
    for method in ("double_backward", "finite_difference"):
        cfg.diagnostics.sharpness.method = method
        values[method], _ = Instruments(cfg, strategy, held).sharpness()
    assert values["finite_difference"] == pytest.approx(values["double_backward"], rel=1e-2)
