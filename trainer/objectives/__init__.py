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

import contextlib
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import Config, ConfigError
from trainer.lora.layer import adapters_off

if TYPE_CHECKING:
    from trainer.parallel import Strategy
    from trainer.run import Run

Batch = dict[str, torch.Tensor]


class Objective:
    """The shared part of the non-sft objectives: the reference model and the batch split."""

    name = "objective"

    def __init__(self, cfg: Config) -> None:
        self.cfg, self.ocfg = cfg, cfg.objective
        self.lora = cfg.lora.enabled
        self.copy: torch.nn.Module | None = None  # the frozen reference copy (full fine-tuning)

    # -- the verbs (see the module docstring) ------------------------------------------------------
    def batch(self, run: Run) -> Batch:
        raise NotImplementedError

    def count(self, batch: Batch) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, strategy: Strategy, piece: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        raise NotImplementedError

    def before_training(self, run: Run) -> None:  # noqa: B027 (DPO's precomputed reference)
        """Once, after resume and before the first step."""

    def evaluate(self, run: Run) -> dict[str, float]:
        """Validation figures at the run's eval cadence (none by default)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        pass

    # -- the reference model ---------------------------------------------------------------------------
    def needs_copy(self) -> bool:
        """Whether this run keeps a frozen copy of the model as its reference."""
        return False

    def setup_reference(self, run: Run) -> None:
        """Build the frozen copy when the run needs one (full fine-tuning, reference on the fly)."""
        if self.needs_copy():
            from trainer.model.build import build_model

            model, weights = build_model(run.model_cfg, run.cfg.train.seed, run.cfg.quant)  # meta: no memory yet
            self.copy = run.strategy.frozen_copy(model, weights)

    @torch.no_grad()
    def reference_logps(self, strategy: Strategy, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The reference's per-token log-probs (B, T) of targets y (0 where ignored), without grad:
        the policy with its adapters off under LoRA, else the frozen copy."""
        if self.copy is not None:
            return self.copy(x, targets=y, token_logps=True)
        if not self.lora:
            raise RuntimeError("no reference model: full fine-tuning needs the frozen copy (setup_reference)")
        with adapters_off(strategy.unwrapped()):
            return strategy.model(x, targets=y, token_logps=True)


def split_batch(batch: Batch, pieces: int) -> list[Batch]:
    """The batch's micro-batches: every tensor chunked along its first dimension (rows)."""
    chunks = {key: value.chunk(pieces) for key, value in batch.items()}
    if any(len(c) != pieces for c in chunks.values()):
        rows = {key: value.size(0) for key, value in batch.items()}
        raise ValueError(f"a batch of {rows} rows does not split into {pieces} micro-batches")
    return [{key: c[i] for key, c in chunks.items()} for i in range(pieces)]


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
        raise ConfigError(f"objective={name} trains on data={wanted} records, not data.format={data}: set data={wanted}")
    if name == "sft" and data in ("preference", "prompts"):
        fix = "objective=dpo" if data == "preference" else "objective=grpo (or rloo)"
        raise ConfigError(f"data.format={data} has no next-token targets for objective=sft: set {fix}")
    if name != "sft" and cfg.train.compile:
        raise ConfigError(f"objective={name} with train.compile=true is not supported yet: set train.compile=false")


@contextlib.contextmanager
def evaluating(model: torch.nn.Module):
    """model.eval() within the block (no dropout in generation), train() again after."""
    model.eval()
    try:
        yield
    finally:
        model.train()
