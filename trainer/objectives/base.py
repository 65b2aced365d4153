"""The shared part of the non-sft objectives (trainer/objectives/__init__.py says how they plug in):
the reference model, the micro-batch split, and evaluation mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from trainer.config import Config, ConfigError
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
        if not self.needs_copy():
            return
        from trainer.model.build import build_model

        strategy = run.strategy
        model, weights = build_model(run.model_cfg, run.cfg.train.seed, run.cfg.quant)  # meta: no memory yet
        split = strategy.name in ("fsdp", "zero3") or strategy.dp_size < strategy.world_size  # sharded, or TP
        shards = strategy.world_size if split else 1
        need = model.num_params() * (2 if run.cfg.precision.dtype in ("bf16", "fp16") else 4) / shards
        if strategy.device.type == "cuda":
            check_copy_fits(self.name, need, torch.cuda.mem_get_info(strategy.device)[0])
        try:
            self.copy = strategy.frozen_copy(model, weights)
        except torch.OutOfMemoryError:
            check_copy_fits(self.name, need, 0)

    @torch.no_grad()
    def reference_logps(self, strategy: Strategy, x: torch.Tensor, y: torch.Tensor, **extra: Any) -> torch.Tensor:
        """The reference's per-token log-probs (B, T) of targets y (0 where ignored), without grad:
        the policy with its adapters off under LoRA, else the frozen copy. extra: positions (packed rows)."""
        if self.copy is not None:
            return self.copy(x, targets=y, token_logps=True, **extra)
        if not self.lora:
            raise RuntimeError("no reference model: full fine-tuning needs the frozen copy (setup_reference)")
        with adapters_off(strategy.unwrapped()):
            return strategy.model(x, targets=y, token_logps=True, **extra)


def check_copy_fits(objective: str, need: float, free: float) -> None:
    """Refuse (one line, with the fix) a full fine-tuning run whose frozen reference copy (`need` bytes
    per rank) does not fit in the `free` device memory left after the policy (10% kept spare)."""
    if need <= 0.9 * free:
        return
    fix = (
        "set objective.precompute_reference=true (the reference log-probs computed once before training, "
        "no copy), or train LoRA adapters (lora=default: the reference is the base with the adapters off)"
        if objective == "dpo"
        else "train LoRA adapters (lora=default: the reference is the base with the adapters off), or set "
        "objective.beta=0 (no KL, no reference)"
    )
    raise ConfigError(
        f"objective={objective} in full fine-tuning keeps a frozen reference copy of the model: {need / 2**30:.1f} "
        f"GiB per rank, and this device has {free / 2**30:.1f} GiB free after the policy: {fix}"
    )


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
