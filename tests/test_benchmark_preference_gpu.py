"""benchmarks.preference_gpu: the rollout memory it adds to trainer.estimate's (checked against what
GPT.generate allocates on a tiny model), its GRPO case's extra reward, and --tiny, both recipes through the
real loop on tiny shapes on the CPU (on a GPU it measures them at their shapes)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from benchmarks.preference_gpu import kv_cache_bytes, main, overrides_of, prompt_logits_bytes
from trainer.config import ModelConfig


def test_rollout_bytes_are_what_generation_allocates(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tiny Qwen3-like GPT generating for left-padded prompts: its KV cache (every layer's keys and values)
    holds kv_cache_bytes, and its prompt pass returns prompt_logits_bytes of logits."""
    import trainer.model.gpt as gpt
    from trainer.model.attention import KVCache

    m = ModelConfig(n_layer=3, n_embd=32, n_head=4, n_kv_head=2, vocab_size=97, block_size=40, mlp="swiglu",
                    norm="rmsnorm", position="rope", qk_norm="head", intermediate_size=48)  # fmt: skip
    caches, logits = [], []
    monkeypatch.setattr(gpt, "KVCache", lambda *a: caches.append(KVCache(*a)) or caches[-1])
    torch.manual_seed(0)
    model = gpt.GPT(m).eval()
    forward = model.forward
    model.forward = lambda *a, **k: logits.append(forward(*a, **k)) or logits[-1]  # noqa: PLW0108
    lengths = torch.tensor([5, 9, 7])
    idx = torch.randint(0, m.vocab_size, (3, 9))
    with torch.no_grad():
        model.generate(idx, 6, prompt_lengths=lengths)
    held = sum(t.numel() * t.element_size() for layer in caches[0].layers for t in (layer.k, layer.v))
    positions = 9 + 6  # the prompt width and the new tokens, not block_size (40)
    assert len(caches) == 1 and held == kv_cache_bytes(m, 3, positions, 4) == 3 * 2 * 2 * 8 * positions * 3 * 4
    assert logits[0].shape == (3, 1, 97) and logits[0].nbytes == prompt_logits_bytes(m, 3, 4)  # the last position


def test_grpo_case_adds_a_reward_that_differs_within_a_group(tmp_path) -> None:
    """The GRPO case keeps the recipe's rewards and adds odd_share (a random base earns none of the recipe's),
    loaded by the run's own loader from the file the case writes; its records fit the prompt room."""
    from trainer.__main__ import compose_config
    from trainer.objectives.rewards import load_rewards

    overrides = overrides_of("qwen3-8b-grpo-lora", 2, tmp_path, tiny=True)
    cfg, _ = compose_config([o for o in overrides if not o.startswith("hydra.")])
    rewards = load_rewards(cfg.objective.rewards)
    assert [r.name for r in rewards] == ["exact_match", "format", "odd_share"]
    scored = rewards[2].function(prompts=["", ""], completions=["", ""], completion_ids=[[1, 3], [2, 4, 5, 6]])
    assert scored == [1.0, 0.25]
    records = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
    room = cfg.train.seq_len - cfg.objective.max_new_tokens
    assert len(records) == 8 * 3 + 16 and all(0 < len(r["prompt"]) <= room and "answer" in r for r in records)
    assert cfg.data.tokenizer == "byte" and cfg.train.device == "cpu" and cfg.model.n_layer == 2


@pytest.mark.slow  # about 35 s on 2 busy CPU cores: two `python -m trainer` runs of 2 steps
def test_tiny_runs_both_recipes_through_the_loop(tmp_path, capsys) -> None:
    """--tiny: each recipe trains 2 steps on a tiny shape of its family through `python -m trainer`, with the
    recipe's batch shape (8 pairs = 16 rows; 2 prompts x 8 generations = 16 rows, 4 micro-batches) and the
    figures the GPU run records; DPO starts at ln 2."""
    out = tmp_path / "out.json"
    results = main(["--tiny", "--steps", "2", "--out", str(out), "--runs", str(tmp_path / "runs")])
    record = json.loads(out.read_text())
    cases = [c["case"] for c in record["cases"]]
    assert record["tiny"] and record["device"] == "cpu" and cases == ["llama3-8b-dpo-lora", "qwen3-8b-grpo-lora"]
    dpo, grpo = results
    for r in results:
        assert "error" not in r, r
        assert r["steps"] == 2 and r["rows_per_micro_batch"] == 16 and r["step_s"] > 0 and r["peak_gib"] is not None
        assert 0 < r["estimate_gib"] < 0.01 and r["target_tokens_per_s"] > 0
        assert [s["step"] for s in r["per_step"]] == [1, 2]
    # tokens/s counts every row at seq_len: 16 rows x 64 positions x 4 micro-batches (DPO), 64 x 48 (GRPO)
    assert dpo["tokens_per_s"] * dpo["step_s"] == pytest.approx(16 * 64 * 4, rel=1e-3)
    assert dpo["per_step"][0]["loss"] == pytest.approx(math.log(2), abs=1e-4) and dpo["generation_share"] is None
    assert grpo["tokens_per_s"] * grpo["step_s"] == pytest.approx(64 * 48, rel=1e-3)
    assert 0 < grpo["generation_share"] < 1 and grpo["generation_s"] > 0 and 0 < grpo["completion_length"] <= 16
    assert grpo["rollout_estimate_gib"] > 0
    resolved = (tmp_path / "runs" / "qwen3-8b-grpo-lora" / ".hydra" / "config.yaml").read_text()
    assert "name: grpo" in resolved and "num_generations: 8" in resolved and "max_new_tokens: 16" in resolved
    assert "llama3-8b-dpo-lora" in capsys.readouterr().out
