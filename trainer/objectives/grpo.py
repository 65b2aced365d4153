"""GRPO (Shao et al. 2024; loss types grpo, dr_grpo, dapo) and RLOO (Ahmadian et al. 2024) on
data=prompts: each step's batch is produced here by a rollout, then trained by the one step.

    rollout   this rank's prompts, each repeated num_generations times, left-padded into one batch
              and sampled by the model's own KV-cache generation (GPT.generate; every rank its own
              prompts, stopping together) -> completions up to the first stop id (kept: it is learned)
              -> reward functions (trainer/objectives/rewards.py) -> advantages within each group
              -> rows prompt + completion whose targets are the completion's tokens
              -> the reference's per-token log-probs (beta > 0) and the pre-update policy's
                 (objective.iterations > 1, or RLOO's KL), without grad
    loss      per token: PPO's clipped ratio times the advantage (+ beta x k3 KL to the reference),
              reduced as loss_type says over the global batch; RLOO: per sequence, the KL in the reward

A group's completions stay on the rank that sampled them, so advantages need no gathering; the
batch-wide figures (reward mean and std, scale_rewards=batch) are summed over ranks.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from trainer.config import Config
from trainer.data.examples import padding_id
from trainer.model.loss import IGNORE_INDEX
from trainer.objectives.base import Batch, Objective, Run, evaluating, split_batch
from trainer.objectives.losses import (
    STD_EPS,
    clipped_objective,
    group_advantages,
    k3_kl,
    reduce_token_losses,
    rloo_advantages,
    token_loss_denominator,
)
from trainer.objectives.rewards import combine, load_rewards, score

if TYPE_CHECKING:
    from trainer.parallel import Strategy


class GRPO(Objective):
    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.name = cfg.objective.name  # grpo | rloo
        self.rewards = load_rewards(self.ocfg.rewards, self.ocfg.reward_weights)  # refused here, before any work
        self.epsilon_high = self.ocfg.epsilon_high if self.ocfg.epsilon_high is not None else self.ocfg.epsilon
        self.buffer: Batch | None = None  # the last rollout, trained on objective.iterations times
        self.uses = 0
        self.rollout_figures: dict[str, float] = {}
        self.rollout_started = 0.0

    def needs_copy(self) -> bool:
        return self.ocfg.beta > 0 and not self.lora

    # -- the rollout ---------------------------------------------------------------------------------
    def batch(self, run: Run) -> Batch:
        if self.buffer is not None and self.uses < self.ocfg.iterations:
            self.uses += 1
            self.rollout_started = time.perf_counter()
            self.rollout_figures["time/generation_s"] = 0.0
            return self.buffer
        self.rollout_started = time.perf_counter()
        (indices,) = run.batches.next_tensors()
        self.buffer, self.uses = self.rollout(run, run.data.train, indices.tolist(), run.state.step), 1
        return self.buffer

    def generate(self, run: Run, prompts: list[list[int]], step: int, temperature: float) -> list[list[int]]:
        """One completion per prompt (ids, through the first stop id), sampled in one left-padded batch."""
        strategy, tokenizer, o = run.strategy, run.data.tokenizer, self.ocfg
        width = max(map(len, prompts))
        pad = padding_id(tokenizer)
        idx = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=strategy.device)
        lengths = torch.tensor([len(p) for p in prompts], device=strategy.device)
        stop = list(getattr(tokenizer, "stop_ids", None) or [tokenizer.eot_id])
        generator = torch.Generator(strategy.device).manual_seed(
            hash((run.cfg.train.seed, step, strategy.dp_rank)) % 2**63  # tensor-parallel peers draw alike
        )
        agree = None
        if strategy.world_size > 1:  # collective: every rank runs as many forwards (sharded weights)
            agree = lambda done: strategy.all_reduce_sum((~done).sum().float(), "generation").item() == 0  # noqa: E731
        model = strategy.unwrapped()
        with torch.no_grad(), evaluating(model), strategy.autocast():
            out = model.generate(
                idx, o.max_new_tokens, temperature=temperature, top_k=o.top_k or None, generator=generator,
                eos_id=stop, top_p=o.top_p, prompt_lengths=lengths, all_done=agree,
            )  # fmt: skip
        completions = []
        for row in out[:, width:].tolist():
            ends = [i for i, token in enumerate(row) if token in stop]
            completions.append(row[: ends[0] + 1] if ends else row)
        return completions

    def rollout(self, run: Run, split, indices: list[int], step: int) -> Batch:
        strategy, tokenizer, o, G = run.strategy, run.data.tokenizer, self.ocfg, self.ocfg.num_generations
        started = time.perf_counter()
        records = [split.prompt(i) for i in indices for _ in range(G)]  # (N = prompts x G)
        completions = self.generate(run, [r.ids for r in records], step, o.temperature)
        generation_s = time.perf_counter() - started
        stop = set(getattr(tokenizer, "stop_ids", None) or [tokenizer.eot_id])
        texts = [tokenizer.decode([t for t in c if t not in stop]) for c in completions]
        scores = score(self.rewards, [r.text for r in records], texts, completions, [r.fields for r in records])
        rewards = combine(scores, self.rewards).to(strategy.device)  # (N,), NaN: no function scored it
        x, y = rows([r.ids for r in records], completions, padding_id(tokenizer), strategy.device)
        batch: Batch = {"x": x, "y": y}
        with torch.no_grad(), evaluating(strategy.unwrapped()), strategy.autocast():
            if o.beta > 0:
                batch["ref_logps"] = self.by_pieces(run, lambda a, b: self.reference_logps(strategy, a, b), x, y)
            if o.iterations > 1 or (self.name == "rloo" and o.beta > 0):
                batch["old_logps"] = self.by_pieces(
                    run, lambda a, b: strategy.model(a, targets=b, token_logps=True), x, y
                )
        mask = (y != IGNORE_INDEX).to(torch.float32)
        scored = torch.nan_to_num(rewards, nan=0.0)
        if self.name == "rloo":
            if o.beta > 0:  # RLOO's KL (k1, summed over the completion) comes off the reward
                scored = scored - o.beta * ((batch["old_logps"] - batch["ref_logps"]) * mask).sum(dim=1)
            advantages = rloo_advantages(scored, G)
        elif o.scale_rewards == "batch":
            advantages = group_advantages(scored, G, "none") / (self.global_std(strategy, scored) + STD_EPS)
        else:
            advantages = group_advantages(scored, G, o.scale_rewards)
        batch["advantages"] = torch.where(torch.isnan(rewards), 0.0, advantages)
        self.rollout_figures = self.figures(strategy, scores, rewards, completions, G)
        self.rollout_figures["time/generation_s"] = generation_s
        return batch

    def by_pieces(self, run: Run, forward, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """forward(x, y) -> (rows, T) over micro-batches of the training step's size (its memory)."""
        return torch.cat([forward(p["x"], p["y"]) for p in split_batch({"x": x, "y": y}, run.accum)])

    @staticmethod
    def global_std(strategy: Strategy, values: torch.Tensor) -> torch.Tensor:
        """The standard deviation (Bessel-corrected) of values over every rank's rows (collective)."""
        s = strategy.all_reduce_sum(
            torch.stack([values.sum(), (values**2).sum(), torch.tensor(float(values.numel()), device=values.device)]),
            "reward std",
        )
        n = s[2]
        return ((s[1] - s[0] ** 2 / n) / (n - 1).clamp(min=1)).clamp(min=0).sqrt()

    def figures(self, strategy: Strategy, scores, rewards, completions, G: int) -> dict[str, float]:
        """The rollout's logged figures over every rank's completions (one collective)."""
        device = strategy.device
        valid = ~torch.isnan(rewards)
        r = torch.where(valid, rewards, 0.0)
        grouped = rewards.reshape(-1, G)
        zero_std = (torch.nan_to_num(grouped.std(dim=1), nan=0.0) < 1e-6).float().sum()
        columns = scores.to(device)
        per_function = [torch.nansum(columns[:, j]) for j in range(columns.size(1))]
        counts = [(~torch.isnan(columns[:, j])).sum().float() for j in range(columns.size(1))]
        length = torch.tensor(float(sum(map(len, completions))), device=device)
        values = torch.stack(
            [
                r.sum(),
                (r**2).sum(),
                valid.sum().float(),
                zero_std,
                torch.tensor(float(grouped.size(0)), device=device),
                length,
                torch.tensor(float(len(completions)), device=device),
                *per_function,
                *counts,
            ]
        )
        v = strategy.all_reduce_sum(values, "rollout figures").tolist()  # collective
        n = max(v[2], 1.0)
        mean = v[0] / n
        std = max((v[1] - v[0] ** 2 / n) / max(n - 1, 1.0), 0.0) ** 0.5
        out = {"reward/mean": mean, "reward/std": std, "frac_reward_zero_std": v[3] / max(v[4], 1.0),
               "completion_length/mean": v[5] / max(v[6], 1.0)}  # fmt: skip
        F = len(self.rewards)
        for j, reward in enumerate(self.rewards):
            out[f"reward/{reward.name}"] = v[7 + j] / max(v[7 + F + j], 1.0)
        return out

    # -- the step --------------------------------------------------------------------------------------
    def count(self, batch: Batch) -> torch.Tensor:
        mask = batch["y"] != IGNORE_INDEX
        if self.name == "rloo":
            return torch.tensor(float(mask.size(0)), device=mask.device)
        return token_loss_denominator(mask, self.ocfg.loss_type, self.ocfg.max_new_tokens)

    def loss(self, strategy: Strategy, piece: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        o = self.ocfg
        mask = (piece["y"] != IGNORE_INDEX).to(torch.float32)
        logps = strategy.model(piece["x"], targets=piece["y"], token_logps=True)  # (rows, T) fp32
        old = piece.get("old_logps", logps.detach())
        advantages = piece["advantages"]
        sums = {
            "completion_tokens": mask.sum(),
            "target_tokens": mask.sum(),
            "rows": torch.tensor(float(mask.size(0)), device=mask.device),
        }
        if self.name == "rloo":
            per_sequence, active = clipped_objective(
                (logps * mask).sum(dim=1), (old * mask).sum(dim=1), advantages, o.epsilon, self.epsilon_high
            )
            sums["clipped"] = active.float().sum()
            return per_sequence.sum(), sums
        per_token, active = clipped_objective(logps, old, advantages[:, None], o.epsilon, self.epsilon_high)
        sums["clipped"] = (active.float() * mask).sum()
        if o.beta > 0:
            kl = k3_kl(logps, piece["ref_logps"])
            per_token = per_token + o.beta * kl
            sums["kl"] = (kl * mask).sum().detach()
        return reduce_token_losses(per_token, mask, o.loss_type), sums

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        tokens = max(sums["completion_tokens"], 1.0)
        out = dict(self.rollout_figures)
        out["clip_ratio"] = sums["clipped"] / (max(sums["rows"], 1.0) if self.name == "rloo" else tokens)
        if "kl" in sums:
            out["kl"] = sums["kl"] / tokens
        elapsed = time.perf_counter() - self.rollout_started
        out["time/generation_share"] = out.get("time/generation_s", 0.0) / max(elapsed, 1e-9)
        return out

    @torch.no_grad()
    def evaluate(self, run: Run) -> dict[str, float]:
        """The mean reward of one greedy completion per validation prompt (the first train.micro_batch_size
        x train.eval_batches of them), every rank its share: val_reward/mean."""
        split, strategy, tc = run.data.val, run.strategy, run.cfg.train
        n = min(len(split), tc.micro_batch_size * tc.eval_batches)
        mine = np.arange(n)[strategy.dp_rank :: strategy.dp_size].tolist() or [0]
        records = [split.prompt(i) for i in mine]
        completions = self.generate(run, [r.ids for r in records], 0, temperature=0.0)
        tokenizer = run.data.tokenizer
        stop = set(getattr(tokenizer, "stop_ids", None) or [tokenizer.eot_id])
        texts = [tokenizer.decode([t for t in c if t not in stop]) for c in completions]
        scores = score(self.rewards, [r.text for r in records], texts, completions, [r.fields for r in records])
        rewards = torch.nan_to_num(combine(scores, self.rewards), nan=0.0).to(strategy.device)
        owned = float(strategy.dp_rank < n)  # a rank without validation prompts joined the forwards only
        total = strategy.all_reduce_sum(
            torch.stack([rewards.sum() * owned, torch.tensor(len(records) * owned, device=strategy.device)]),
            "validation reward",
        )
        return {"val_reward/mean": (total[0] / total[1].clamp(min=1)).item()}


def rows(
    prompts: list[list[int]], completions: list[list[int]], pad: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training rows prompt + completion, right-padded to the longest: x (N, T) and targets y (N, T),
    y[t] = x[t + 1] where that token is the completion's, else IGNORE_INDEX."""
    width = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
    x = torch.full((len(prompts), width), pad, dtype=torch.long)
    y = torch.full((len(prompts), width), IGNORE_INDEX, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        ids = torch.tensor(p + c)
        x[i, : len(ids)] = ids
        if c:
            y[i, len(p) - 1 : len(ids) - 1] = torch.tensor(c)
    return x.to(device), y.to(device)
