"""objective=dpo: the step's numerics on a tiny LoRA model (ln 2 at step zero, the reference as adapters
off, precomputed = on the fly, accumulation, padding), end-to-end runs on data=preference."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import GPT2_LIKE, LLAMA_LIKE, randomize_adapters

from trainer.config import Config
from trainer.config.load import compose_config
from trainer.lora.layer import adapters_off
from trainer.model.loss import IGNORE_INDEX
from trainer.objectives.dpo import DPO
from trainer.step import train_step


def lora_dpo(loss: str = "sigmoid", like=LLAMA_LIKE, **extra) -> tuple[Config, DPO, object]:
    """A tiny model with LoRA adapters (B = 0) on one process, and objective=dpo."""
    from trainer.lora.run import add_adapters
    from trainer.model.build import build_model
    from trainer.parallel import build_strategy, parallelize

    overrides = [f"model.{k}={v}" for k, v in like.items()] + ["lora=default", "lora.base_dtype=fp32", "objective=dpo"]
    cfg, _ = compose_config([*overrides, f"objective.loss={loss}", *extra.get("overrides", [])])
    strategy = build_strategy(cfg)
    model, weights = build_model(cfg.model, 0, cfg.quant)
    weights, _, _ = add_adapters(model, weights, cfg, cfg.model)
    parallelize(model, weights, cfg, strategy)
    return cfg, DPO(cfg), strategy


def pairs_batch(pairs: int = 4, T: int = 16, vocab: int = 97, seed: int = 0) -> dict[str, torch.Tensor]:
    """Rows 2k / 2k + 1: pair k's chosen / rejected, the same prompt (first tokens), completions after it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (2 * pairs, T), generator=g)
    y = torch.full_like(x, IGNORE_INDEX)
    for k in range(pairs):
        prompt = 3 + k % 3
        x[2 * k + 1, :prompt] = x[2 * k, :prompt]
        for row, end in ((2 * k, T - k), (2 * k + 1, T - 1 - (k % 2))):
            y[row, prompt - 1 : end - 1] = x[row, prompt:end]
    return {"x": x, "y": y}


def test_first_loss_is_ln2_with_rewards_zero_under_lora() -> None:
    cfg, dpo, strategy = lora_dpo()
    result = train_step(strategy, None, None, 1, 1.0, objective=dpo, batch=pairs_batch())
    assert result.loss == pytest.approx(math.log(2), abs=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert result.objective[name] == 0.0, name
    assert result.objective["rewards/accuracies"] == 0.0  # no pair's reward is strictly larger yet
    assert result.grad_norm > 0  # ... but B's gradient is not zero: the adapters move
    assert result.objective["logps/chosen"] < 0 and result.target_tokens == int((pairs_batch()["y"] != -100).sum())


@pytest.mark.parametrize("loss", ["sigmoid", "ipo", "hinge", "robust"])
def test_precomputed_reference_equals_adapters_off_and_accumulation_changes_nothing(loss: str) -> None:
    extra = {"overrides": ["objective.label_smoothing=0.2"] if loss == "robust" else []}
    results = []
    for precomputed, accum in ((False, 1), (True, 1), (False, 2), (True, 4)):
        cfg, dpo, strategy = lora_dpo(loss, **extra)
        model = strategy.unwrapped()
        randomize_adapters(model)  # the policy away from its reference
        batch = pairs_batch()
        if precomputed:
            with torch.no_grad(), adapters_off(model):
                batch["ref_logps"] = model(batch["x"], targets=batch["y"], token_logps=True).sum(dim=1)
        result = train_step(strategy, None, None, accum, 0.0, objective=dpo, batch=batch)
        grads = torch.stack([result.grad_sumsq[k] for k in sorted(result.grad_sumsq)])  # per group, before the step
        results.append((result, grads))
    (first, g0), *others = results
    assert first.loss != pytest.approx(math.log(2), abs=1e-3)  # the adapters moved the policy
    assert first.objective["rewards/margins"] != 0.0
    for other, g in others:
        assert other.loss == pytest.approx(first.loss, rel=1e-6, abs=1e-7)
        for name, value in first.objective.items():
            assert other.objective[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
        assert torch.allclose(g, g0, rtol=1e-5, atol=1e-12)


def test_log_probs_do_not_depend_on_the_padding_side_or_the_pad_token() -> None:
    cfg, dpo, strategy = lora_dpo(like=GPT2_LIKE)
    model = strategy.unwrapped()
    batch = pairs_batch(T=12)
    lengths = (batch["y"] != IGNORE_INDEX).int().cumsum(1).argmax(1) + 2  # each row's real tokens
    right = model(batch["x"], targets=batch["y"], token_logps=True).sum(1)
    for pad in (0, 55):
        x, y = batch["x"].clone(), batch["y"].clone()
        for row, n in enumerate(lengths.tolist()):
            x[row, n:] = pad  # the padding itself
        padded = model(x, targets=y, token_logps=True).sum(1)
        assert torch.allclose(padded, right, atol=1e-5), pad
        # left padding: the same rows shifted right, each token's position counted from its row's start
        T, width = x.size(1), 4
        left_x = torch.full((x.size(0), T + width), pad)
        left_y = torch.full((x.size(0), T + width), IGNORE_INDEX)
        positions = torch.zeros_like(left_x)
        for row, n in enumerate(lengths.tolist()):
            shift = T + width - n
            left_x[row, shift:] = x[row, :n]
            left_y[row, shift:] = y[row, :n]
            positions[row, :shift] = torch.arange(shift)  # the padding run: a document of its own
            positions[row, shift:] = torch.arange(n)
        left = model(left_x, targets=left_y, positions=positions, token_logps=True).sum(1)
        assert torch.allclose(left, right, atol=1e-5), pad


def test_packed_pairs_give_the_unpacked_loss_and_gradient(tmp_path) -> None:
    """data.packing: pairs share rows (document masks keep each sequence to itself); the loss, figures
    and gradient equal one row per sequence, with the reference on the fly and precomputed."""
    import json

    import numpy as np

    from trainer.data import build_data

    path = tmp_path / "pairs.jsonl"
    records = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}." * (1 + i % 3), "rejected": "No."}
               for i in range(10)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    like = dict(LLAMA_LIKE, vocab_size=257, block_size=128)
    results = []
    for packing, seq_len in ((False, 64), (True, 128)):
        cfg, dpo, strategy = lora_dpo(like=like, overrides=["data=preference", f"data.path={path}", "data.tokenizer=byte",
                                                            f"data.cache_dir={tmp_path}", "data.val_fraction=0.2"])  # fmt: skip
        cfg.data.packing = packing
        split = build_data(cfg.data, seq_len, 0).train
        randomize_adapters(strategy.unwrapped())
        batch = dict(zip(split.fields, split.get_batch(np.arange(len(split))), strict=True))
        result = train_step(strategy, None, None, 1, 0.0, objective=dpo, batch=batch)
        results.append((result, torch.stack([result.grad_sumsq[k] for k in sorted(result.grad_sumsq)])))
    (plain, g0), (packed, g1) = results
    assert plain.loss == pytest.approx(packed.loss, rel=1e-5) and plain.loss != pytest.approx(math.log(2), abs=1e-3)
    for name, value in plain.objective.items():
        assert packed.objective[name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert plain.target_tokens == packed.target_tokens
    assert torch.allclose(g0, g1, rtol=1e-4, atol=1e-12)
