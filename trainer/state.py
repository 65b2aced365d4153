"""The run's own counters: where a resumed run continues from. A Stateful part of every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Counters of one run. `step` counts optimizer steps taken or skipped; `tokens` every token of
    every global batch; `target_tokens` those that counted toward the loss (not masked)."""

    step: int = 0
    tokens: int = 0
    target_tokens: int = 0
    skipped_steps: int = 0  # steps skipped for inf / NaN gradients (loss-scale overflows)
    consecutive_skips: int = 0  # of those, in a row up to now: the run stops after too many
    logger_run_id: str | None = None  # wandb's run id: a resumed run continues the same wandb run

    def record(self, tokens: int, target_tokens: int, stepped: bool, non_finite: bool) -> None:
        """Count one step of `tokens` tokens; non_finite: it was skipped for inf / NaN gradients."""
        self.step += 1
        self.tokens += tokens
        self.target_tokens += target_tokens
        if stepped:
            self.consecutive_skips = 0
        elif non_finite:
            self.skipped_steps += 1
            self.consecutive_skips += 1

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in dataclasses.fields(self):
            setattr(self, field.name, state[field.name])
