"""What a step minimises: `objective=sft` (the next-token loss, trainer/step.py's own path), `dpo`
(preference pairs) or `grpo` / `rloo` (completions the model samples, scored by reward functions).

An objective plugs into the one step (trainer/step.py, `objective_forward_backward`) through four verbs:

    batch(run)              this rank's share of the next global batch, as named tensors: read from the
                            data (DPO) or produced by a rollout (generation, rewards, advantages: GRPO)
    count(batch)            this rank's share of the step's denominator (pairs, sequences, tokens),
                            summed over ranks before the first forward
    loss(strategy, piece)   one micro-batch: the numerator of the step's loss (the caller divides by
                            the global count) and the sums its metrics are made of
    metrics(sums, count)    the step's logged figures from the sums over the global batch

The reference model (DPO, and GRPO's KL) is the base with the adapters off under LoRA (no second
model), else a frozen copy sharded like the policy (`Strategy.frozen_copy`), or for DPO log-probs
computed once before training (`objective.precompute_reference`).
"""

from __future__ import annotations

from trainer.config import Config, ConfigError
from trainer.objectives.base import Batch, Objective, evaluating, split_batch

__all__ = ["Batch", "Objective", "build_objective", "check_objective", "evaluating", "split_batch"]


def build_objective(cfg: Config) -> Objective | None:
    """The objective cfg.objective names (None for sft: the step's own token loss)."""
    name = cfg.objective.name
    if name == "sft":
        return None
    if name == "dpo":
        from trainer.objectives.dpo import DPO

        return DPO(cfg)
    from trainer.objectives.grpo import GRPO

    return GRPO(cfg)


def check_objective(cfg: Config) -> None:
    """The rules between objective= and the rest of the config, one line each (preflight)."""
    name, data = cfg.objective.name, cfg.data.format
    wanted = {"dpo": "preference", "grpo": "prompts", "rloo": "prompts"}.get(name)
    if wanted and data != wanted:
        raise ConfigError(
            f"objective={name} trains on data={wanted} records, not data.format={data}: set data={wanted}"
        )
    if name == "sft" and data in ("preference", "prompts"):
        fix = "objective=dpo" if data == "preference" else "objective=grpo (or rloo)"
        raise ConfigError(f"data.format={data} has no next-token targets for objective=sft: set {fix}")
    if name in ("grpo", "rloo"):  # each reward function imported now: a bad one stops the run before any work
        from trainer.objectives.rewards import load_rewards

        load_rewards(cfg.objective.rewards, cfg.objective.reward_weights)
    if name != "sft" and cfg.train.compile:
        raise ConfigError(f"objective={name} with train.compile=true is not supported yet: set train.compile=false")
