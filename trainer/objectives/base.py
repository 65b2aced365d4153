"""The shared part of the non-sft objectives (trainer/objectives/__init__.py says how they plug in):
the reference model, the micro-batch split, and evaluation mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import Config
from trainer.lora.layer import adapters_off

if TYPE_CHECKING:
    from trainer.parallel import Strategy

Batch = dict[str, torch.Tensor]
Run = Any  # trainer.run.Run (not imported: the run builds the objective)


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


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[None]:
    """model.eval() within the block (no dropout in generation), train() again after."""
    model.eval()
    try:
        yield
    finally:
        model.train()
