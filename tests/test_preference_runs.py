"""objective=dpo / grpo end to end through `python -m trainer` on a tiny Llama with its own tokenizer:
the first DPO loss is ln 2, the reward accuracy rises, the frozen copy (full fine-tuning) and the
precomputed reference (resumed) agree with adapters-off; GRPO's batched generation and a rollout run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import hf_llama, read_metrics, run_cli, save_tiny_tokenizer, torchrun

from trainer.config import ConfigError
from trainer.config.load import compose_config
from trainer.objectives.base import check_copy_fits

COLOURS = "red green blue yellow".split()


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a Llama-3-style tokenizer (BOS, chat template), 40 preference pairs
    (chosen: the colour the prompt names, then "yes"; rejected: the next colour, "no") and 40 prompts."""
    root = tmp_path_factory.mktemp("toy")
    vocab = save_tiny_tokenizer(root / "llama", "llama3")
    torch.manual_seed(0)
    hf_llama(vocab_size=vocab, hidden_size=32, intermediate_size=48, max_position_embeddings=128).save_pretrained(
        root / "llama"
    )
    with open(root / "pairs.jsonl", "w") as f:
        for i in range(40):
            pair = {
                "prompt": f"colour {i}",
                "chosen": f"{COLOURS[i % 4]} yes",
                "rejected": f"{COLOURS[(i + 1) % 4]} no",
            }
            f.write(json.dumps(pair) + "\n")
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(40):
            f.write(json.dumps({"prompt": f"say {COLOURS[i % 4]}", "answer": COLOURS[i % 4]}) + "\n")
    (root / "even.py").write_text(
        "def even(prompts, completions, completion_ids, **fields):\n"
        "    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]\n"
    )
    return root


def dpo_args(toy: Path, run: str, *extra: str, lora: bool = True) -> list[str]:
    return [
        "objective=dpo", "data=preference", f"data.path={toy / 'pairs.jsonl'}", f"model.pretrained={toy / 'llama'}",
        *(["lora=default", "lora.base_dtype=fp32"] if lora else []), "train.seq_len=32", "train.micro_batch_size=4", "train.max_steps=12",
        "train.log_interval=1", "train.eval_interval=12", "optim.lr=5e-3", "optim.warmup_steps=0", "logger.wandb=false",
        f"data.cache_dir={toy / 'cache'}", "data.val_fraction=0.1", "train.sample_tokens=0", f"hydra.run.dir={toy / run}",
        *extra,
    ]  # fmt: skip


def test_dpo_run_starts_at_ln2_and_learns_the_preference(toy: Path) -> None:
    result = run_cli(*dpo_args(toy, "dpo"), cwd=toy)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(toy / "dpo")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # LoRA's B = 0: policy = reference
    assert rows[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    last = rows[-1]
    assert last["rewards/accuracies"] >= 0.9 and last["rewards/margins"] > 0.1, last
    assert last["val_rewards/accuracies"] >= 0.75 and last["val_loss"] < math.log(2), last
    assert last["loss"] < rows[0]["loss"] - 0.05


@pytest.mark.slow
def test_frozen_copy_and_precomputed_reference_agree_with_adapters_off(toy: Path) -> None:
    losses = {}
    for name, extra in {
        "on_the_fly": [],
        "precomputed": ["objective.precompute_reference=true", "checkpoint.interval=2"],
    }.items():
        result = run_cli(*dpo_args(toy, name, "train.max_steps=3", *extra), cwd=toy)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = [row["loss"] for row in read_metrics(toy / name)]
    assert losses["precomputed"] == pytest.approx(losses["on_the_fly"], rel=1e-5)
    stored = list((toy / "cache").glob("*/reference-*.npy"))
    assert len(stored) == 2  # train and validation pairs
    # resume at step 2: the stored reference is read back (the policy has moved: it could not be recomputed)
    result = run_cli(*dpo_args(toy, "precomputed", "train.max_steps=4", "objective.precompute_reference=true",
                               "train.resume=auto"), cwd=toy)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "read" in (toy / "precomputed" / "logs" / "rank0.log").read_text()
    assert read_metrics(toy / "precomputed")[2]["loss"] == pytest.approx(losses["precomputed"][2], rel=1e-6)
    # full fine-tuning: the reference is a frozen copy of the model, so the first loss is ln 2 as well
    result = run_cli(*dpo_args(toy, "full", "train.max_steps=2", "optim.lr=1e-3", lora=False), cwd=toy)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(toy / "full")
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-5) and rows[1]["loss"] < math.log(2)


def test_a_copy_that_does_not_fit_is_refused_with_the_fix() -> None:
    check_copy_fits("dpo", 1e9, 2e9)
    with pytest.raises(ConfigError, match=r"16.0 GiB per rank.*10.0 GiB free.*objective.precompute_reference=true"):
        check_copy_fits("dpo", 16 * 2**30, 10 * 2**30)
    with pytest.raises(ConfigError, match="objective.beta=0"):
        check_copy_fits("grpo", 16 * 2**30, 10 * 2**30)


def test_grpo_needs_two_generations_and_reward_functions() -> None:
    with pytest.raises(Exception, match=r"objective.num_generations=1: grpo compares .* at least 2"):
        compose_config(["objective=grpo", "objective.num_generations=1", "objective.rewards=[exact_match]"])
    with pytest.raises(Exception, match="objective.rewards"):
        compose_config(["objective=grpo", "objective.rewards=[]"])


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(toy: Path) -> None:
    from trainer.model.build import build_model
    from trainer.parallel.base import materialize
    from trainer.preflight import resolve_model_config

    cfg, _ = compose_config([f"model.pretrained={toy / 'llama'}"])
    model_cfg = resolve_model_config(cfg.model, 384)
    model, weights = build_model(model_cfg, 0, cfg.quant)
    materialize(model, weights, torch.device("cpu"))
    model.eval()
    prompts = [[5, 17, 33, 8, 90, 12], [44, 3], [7, 7, 81]]
    width = max(map(len, prompts))
    idx = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    lengths = torch.tensor([len(p) for p in prompts])
    out = model.generate(idx, 10, temperature=0.0, prompt_lengths=lengths, eos_id=[1])
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 10, temperature=0.0, eos_id=[1])[0, len(prompt) :].tolist()
        batched = out[row, width:].tolist()[: len(alone)]
        assert batched == alone, row


@pytest.mark.slow
def test_grpo_run_raises_a_verifiable_reward(toy: Path) -> None:
    result = run_cli(
        "objective=grpo", "data=prompts", f"data.path={toy / 'prompts.jsonl'}", f"model.pretrained={toy / 'llama'}",
        "train.seq_len=32", "train.micro_batch_size=4",  # full fine-tuning: the KL's reference is a frozen copy
        "objective.num_generations=8", "objective.max_new_tokens=8", f"objective.rewards=[{toy / 'even.py'}:even]",
        "objective.beta=0.04", "train.max_steps=16", "train.log_interval=1", "train.eval_interval=100",
        "optim.lr=1e-2", "optim.warmup_steps=0", "logger.wandb=false", f"data.cache_dir={toy / 'cache'}",
        "data.val_fraction=0.1", "train.sample_tokens=0", f"hydra.run.dir={toy / 'grpo'}", cwd=toy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(toy / "grpo")
    first = sum(r["reward/mean"] for r in rows[:4]) / 4
    last = sum(r["reward/mean"] for r in rows[-4:]) / 4
    assert last > first + 0.1, (first, last)
    assert all(0 < r["time/generation_share"] < 1 and r["kl"] >= 0 for r in rows)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # the copy is the policy before its first step


@pytest.mark.slow
def test_rloo_reuses_its_generations_for_objective_iterations_steps(toy: Path) -> None:
    """objective.iterations=2: every other step samples; the step after trains on the same completions
    (same rewards, no generation time) with the ratio away from 1, so the clip can bite."""
    result = run_cli(
        "objective=rloo", "data=prompts", f"data.path={toy / 'prompts.jsonl'}", f"model.pretrained={toy / 'llama'}",
        "train.seq_len=32", "train.micro_batch_size=2", "objective.num_generations=4", "objective.max_new_tokens=8",
        f"objective.rewards=[{toy / 'even.py'}:even]", "objective.iterations=2", "train.max_steps=4",
        "train.log_interval=1", "train.eval_interval=100", "optim.lr=1e-2", "optim.warmup_steps=0",
        "logger.wandb=false", f"data.cache_dir={toy / 'cache'}", "data.val_fraction=0.1", "train.sample_tokens=0",
        f"hydra.run.dir={toy / 'rloo'}", cwd=toy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(toy / "rloo")
    totals = [0, *(row["target_tokens"] for row in rows)]  # the log's running count
    trained = [b - a for a, b in zip(totals[:-1], totals[1:], strict=True)]  # per step
    for step, (first, second) in ((0, rows[0:2]), (2, rows[2:4])):
        assert first["time/generation_s"] > 0 and second["time/generation_s"] == 0.0
        assert second["reward/mean"] == first["reward/mean"] and trained[step + 1] == trained[step]
        assert first["clip_ratio"] == 0.0  # the first use: the ratio is exactly 1
        assert second["loss"] != 0.0  # RLOO's advantages sum to 0 per group: only a moved ratio makes a loss


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp", "zero3"])
def test_grpo_rollouts_run_on_two_sharded_ranks(toy: Path, strategy: str) -> None:
    """GRPO under torchrun with sharded weights: every rank samples its own prompts (the ranks stop
    generating together: each forward gathers weights on all of them), the KL's reference is the adapters
    off, the held-out greedy reward is summed over ranks."""
    result = torchrun(
        "-m", "trainer", f"parallel={strategy}", "objective=grpo", "data=prompts", f"data.path={toy / 'prompts.jsonl'}",
        f"model.pretrained={toy / 'llama'}", "lora=default", "lora.base_dtype=fp32", "train.seq_len=32",
        "train.micro_batch_size=2", "objective.num_generations=4", "objective.max_new_tokens=8", "objective.beta=0.04",
        f"objective.rewards=[{toy / 'even.py'}:even]", "train.max_steps=2", "train.log_interval=1",
        "train.eval_interval=2", "logger.wandb=false", f"data.cache_dir={toy / 'cache'}", "data.val_fraction=0.1",
        "train.sample_tokens=0", f"hydra.run.dir={toy / ('grpo-' + strategy)}", cwd=toy,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(toy / f"grpo-{strategy}")
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["global_batch"] == 4  # 2 prompts on each of 2 ranks
    assert 0 <= rows[1]["val_reward/mean"] <= 1 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)
    assert all(0 < r["completion_length/mean"] <= 8 for r in rows)
