"""Direct preference optimisation (Rafailov et al. 2023) and its variants (objective.loss: sigmoid,
ipo, hinge, robust), on data=preference batches: rows 2k and 2k + 1 are pair k's chosen and rejected
completions after the same prompt, one forward pass for both. A pair's log-probability is the sum of
its completion tokens' log-probs in fp32. The step's loss is the sum of the pairs' losses over the
global batch divided by its number of pairs (accumulation and ranks change nothing). Logged with
TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
logps/rejected.

The reference: under LoRA the policy with its adapters off; else a frozen copy; or, with
objective.precompute_reference, every pair's reference log-probs computed once before the first step
(by the policy as it starts, which is the reference), stored beside the data cache and read back on
resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.config import Config
from trainer.model.loss import IGNORE_INDEX
from trainer.objectives.base import Batch, Objective, Run, evaluating, split_batch
from trainer.objectives.losses import dpo_losses, dpo_rewards

if TYPE_CHECKING:
    from trainer.parallel import Strategy

log = logging.getLogger("trainer")

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


class DPO(Objective):
    name = "dpo"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.precompute = self.ocfg.precompute_reference

    def needs_copy(self) -> bool:
        return not self.lora and not self.precompute

    def batch(self, run: Run) -> Batch:
        return dict(zip(run.data.train.fields, run.batches.next_tensors(), strict=True))

    def count(self, batch: Batch) -> torch.Tensor:
        if "sequence" in batch:  # packed rows: a row's pairs are numbered 0 .. k - 1 (sequences 0 .. 2k - 1)
            return ((batch["sequence"].amax(dim=1) + 1) // 2).sum().to(torch.float32)
        return torch.tensor(batch["x"].size(0) / 2, device=batch["x"].device)  # pairs

    def pair_logps(
        self, strategy: Strategy, piece: Batch, reference: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each sequence's summed completion log-prob (2P,), laid out chosen, rejected, ..., for the policy
        (with grad) and the reference, and its completion's target count (2P,). reference=False: the
        policy's stand in for the reference's (precomputing them before the first step, full fine-tuning)."""
        x, y = piece["x"], piece["y"]
        extra = {"positions": piece["positions"]} if "positions" in piece else {}
        logps = strategy.model(x, targets=y, token_logps=True, **extra)  # (B, T) fp32
        ref = piece.get("ref_logps")  # (B,) or, packed, (B, S)
        ref_tokens = None
        if ref is None:
            ref_tokens = self.reference_logps(strategy, x, y, **extra) if reference else logps.detach()
        tokens = (y != IGNORE_INDEX).to(torch.float32)
        if "sequence" not in piece:  # a row per sequence
            ref = ref if ref is not None else ref_tokens.sum(dim=1)
            return logps.sum(dim=1), ref.to(logps), tokens.sum(dim=1)
        sequence = piece["sequence"]  # (B, T): 2j / 2j + 1 on pair j's chosen / rejected tokens, -1 on padding
        S = ref.size(1) if ref is not None else 2 * ((int(sequence.max()) + 2) // 2)  # host sync (packed, on the fly)
        sums = [per_sequence(v, sequence, S) for v in (logps, tokens, torch.ones_like(tokens))]
        if ref is None:
            ref = per_sequence(ref_tokens, sequence, S)
        present = sums[2][:, 0::2] > 0  # (B, S / 2): the pair slots a row fills
        pick = lambda v: torch.stack([v[:, 0::2][present], v[:, 1::2][present]], dim=1).reshape(-1)  # noqa: E731
        return pick(sums[0]), pick(ref.to(logps)), pick(sums[1])

    def loss(self, strategy: Strategy, piece: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, ref, tokens = self.pair_logps(strategy, piece)  # (2P,) each
        losses, sums = self.pair_losses(logps, ref, tokens)
        sums["target_tokens"] = tokens.sum().to(torch.float32)
        return losses.sum(), sums

    def pair_losses(
        self, logps: torch.Tensor, ref: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses (pairs,) and the metric sums, from rows' log-probs laid out chosen, rejected."""
        o = self.ocfg
        chosen, rejected, ref_chosen, ref_rejected = logps[0::2], logps[1::2], ref[0::2], ref[1::2]
        losses = dpo_losses(
            chosen, rejected, ref_chosen, ref_rejected, loss=o.loss, beta=o.beta, label_smoothing=o.label_smoothing,
            chosen_tokens=tokens[0::2], rejected_tokens=tokens[1::2],
        )  # fmt: skip
        reward_chosen, reward_rejected = dpo_rewards(chosen, rejected, ref_chosen, ref_rejected, o.beta)
        values = (
            reward_chosen, reward_rejected, (reward_chosen > reward_rejected).float(), reward_chosen - reward_rejected,
            chosen.detach(), rejected.detach(),
        )  # fmt: skip
        return losses, {name: value.sum() for name, value in zip(METRICS, values, strict=True)}

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {name: sums[name] / count for name in METRICS}

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """The DPO loss and reward figures over the first train.eval_batches micro-batches of validation
        pairs (the same ones each time), every rank its share: val_loss, val_rewards/accuracies, ..."""
        split, strategy, tc = run.data.val, run.strategy, run.cfg.train
        n = min(len(split), tc.micro_batch_size * tc.eval_batches)
        mine = np.arange(n)[strategy.dp_rank :: strategy.dp_size]  # tensor-parallel peers: the same pairs
        rounds = -(-n // (tc.micro_batch_size * strategy.dp_size))  # every rank runs as many forwards
        totals = torch.zeros(len(METRICS) + 2, device=strategy.device)
        with evaluating(strategy.unwrapped()), strategy.autocast():
            for r in range(rounds):
                part = mine[r * tc.micro_batch_size : (r + 1) * tc.micro_batch_size]
                piece = dict(zip(split.fields, split.get_batch(part if len(part) else mine[:1]), strict=True))
                piece = {k: v.to(strategy.device) for k, v in piece.items()}
                losses, sums = self.pair_losses(*self.pair_logps(strategy, piece))
                weight = 1.0 if len(part) else 0.0  # a rank out of pairs still joins the forwards
                totals += weight * torch.stack(
                    [losses.sum(), *sums.values(), torch.tensor(len(losses), device=totals.device, dtype=totals.dtype)]
                )
        totals = strategy.all_reduce_sum(totals, "validation sums").tolist()  # collective
        count = max(totals[-1], 1.0)
        return {"val_loss": totals[0] / count} | {
            f"val_{k}": v / count for k, v in zip(METRICS, totals[1:-1], strict=True)
        }

    # -- the precomputed reference ------------------------------------------------------------------
    def before_training(self, run: Run) -> None:
        if self.precompute:
            for role, split in (("train", run.data.train), ("val", run.data.val)):
                split.set_reference(self.precomputed(run, split, role))

    def precomputed(self, run: Run, split, role: str) -> np.ndarray:
        """Every row's reference log-prob (2 * pairs,) float32 of `split`: read from its file, or computed
        now (every rank its share, summed over ranks) and written by rank 0, before any step."""
        path = reference_file(run.cfg, split, role)
        if path.exists():
            values = np.load(path)
            log.info(f"objective.precompute_reference: read {len(values)} reference log-probs from {path}")
            return values
        if run.state.step > 0:
            raise RuntimeError(
                f"{path} is gone, and the run is at step {run.state.step}: the reference cannot be computed again "
                "from a policy that has trained; restore the file or start afresh"
            )
        strategy, micro = run.strategy, run.cfg.train.micro_batch_size
        values = torch.zeros(2 * split.pairs, device=strategy.device)
        rounds = -(-len(split) // (micro * strategy.dp_size))  # every rank runs as many forwards
        mine = np.arange(len(split))[strategy.dp_rank :: strategy.dp_size]  # tensor-parallel peers: the same
        with evaluating(strategy.unwrapped()), strategy.autocast():
            for r in range(rounds):
                units = mine[r * micro : (r + 1) * micro]
                batch = split.get_batch(units if len(units) else mine[:1])
                piece = {k: v.to(strategy.device) for k, v in zip(split.fields, batch, strict=False)}
                piece.pop("ref_logps", None)
                with torch.no_grad():  # LoRA: the adapters off (an init_from adapter too); else the policy as it starts
                    _, ref, _ = self.pair_logps(strategy, piece, reference=self.lora)
                if len(units):
                    pairs = np.concatenate(split.pairs_of(units))
                    rows = torch.from_numpy(np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1))
                    values[rows.to(strategy.device)] = ref.to(values)
        values = strategy.all_reduce_sum(values, "reference log-probs").cpu().numpy().astype(np.float32)  # collective
        if strategy.rank == 0:
            tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
            np.save(tmp, values)
            os.replace(tmp, path)
        strategy.barrier()  # collective
        log.info(f"objective.precompute_reference: {len(values)} reference log-probs computed, stored in {path}")
        return values


def per_sequence(values: torch.Tensor, sequence: torch.Tensor, S: int) -> torch.Tensor:
    """(B, S): values (B, T) summed over each row's tokens of each sequence index (-1: none)."""
    kept = torch.where(sequence >= 0, values, torch.zeros_like(values))
    return values.new_zeros(values.size(0), S).scatter_add(1, sequence.clamp(min=0), kept)


def reference_file(cfg: Config, split, role: str) -> Path:
    """Where a split's precomputed reference log-probs live: beside its data cache, named by what
    they depend on (the model's source and shape, the adapters it starts from, the precision, the rows)."""
    identity = {
        "model": {k: v for k, v in vars(cfg.model).items() if not k.startswith("_")},
        "pretrained_mtime": _mtime(cfg.model.pretrained),
        "lora_init_from": cfg.lora.init_from,
        "seed": cfg.train.seed if cfg.model.pretrained is None else None,
        "precision": cfg.precision.dtype,
        "lora_base_dtype": cfg.lora.base_dtype if cfg.lora.enabled else None,
        "split": [role, len(split), cfg.data.val_fraction],
        "seq_len": cfg.train.seq_len,
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return Path(split.directory) / f"reference-{digest}.npy"


def _mtime(path: str | None) -> float | None:
    if not path:
        return None
    return max((p.stat().st_mtime for p in Path(path).glob("*.safetensors")), default=None)


__all__ = ["DPO", "reference_file", "split_batch"]
