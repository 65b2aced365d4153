"""The run's own counters: where a resumed run continues from. A Stateful part of every checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from trainer.config import ConfigError


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
        self.advance(tokens)
        self.count(target_tokens, stepped, non_finite)

    def advance(self, tokens: int) -> None:
        """One step of `tokens` tokens ran (its figures may be read back later: `count`)."""
        self.step += 1
        self.tokens += tokens

    def count(self, target_tokens: int, stepped: bool, non_finite: bool) -> None:
        """What a step that ran did: its target tokens, and whether it stepped or was skipped."""
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


class TokenizerRef:
    """A checkpoint's reference to the tokenizer its run trained with: the directory inside the run
    dir where the run saved it (export and generate read it from there) and its fingerprint, so
    resuming with another tokenizer is refused instead of training on ids that mean other text."""

    def __init__(self, directory: str | None, fingerprint: str) -> None:
        self.directory = directory  # relative to the run dir; None: not saved (byte / identity)
        self.fingerprint = fingerprint

    def state_dict(self) -> dict[str, Any]:
        return {"directory": self.directory, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["fingerprint"] != self.fingerprint:
            raise ConfigError(
                f"the checkpoint was trained with another tokenizer ({state['fingerprint']}, this run has "
                f"{self.fingerprint}): resume with the run's own data.tokenizer, or start a new run dir"
            )
