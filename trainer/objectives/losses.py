"""The numerics of the preference and RL objectives, as pure functions of log-probabilities and rewards
(no model, no distribution): DPO's per-pair losses, GRPO's and RLOO's advantages, the clipped ratio,
the k3 KL estimate and the reductions of token losses. TRL's DPOTrainer / GRPOTrainer / RLOOTrainer are
the reference (tests/test_trl_parity.py); the formulas are the papers'.

Every reduction is split into a numerator summed over rows (what a micro-batch contributes) and a
denominator counted over the whole global batch (pairs, sequences or completion tokens, summed over
micro-batches and ranks before the first forward), so accumulation and ranks change nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

STD_EPS = 1e-4  # GRPO's advantage: (R - mean) / (std + 1e-4), as TRL


def dpo_losses(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    loss: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-pair DPO losses (P,) from summed completion log-probs (P,) of the policy and the reference.

    delta = (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps), then
      sigmoid: -(1 - ls) log sigmoid(beta delta) - ls log sigmoid(-beta delta)   (Rafailov et al. 2023; cDPO)
      hinge:   relu(1 - beta delta)                                              (SLiC)
      ipo:     (delta' - 1 / (2 beta))^2, delta' from log-ratios averaged over each completion's tokens
      robust:  ((1 - ls) (-log sigmoid(beta delta)) - ls (-log sigmoid(-beta delta))) / (1 - 2 ls)  (Chowdhury et al.)
    ipo needs chosen_tokens / rejected_tokens (P,), the completions' target counts.
    """
    chosen = chosen_logps - ref_chosen_logps
    rejected = rejected_logps - ref_rejected_logps
    delta = chosen - rejected
    if loss == "sigmoid":
        return -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    if loss == "hinge":
        return torch.relu(1 - beta * delta)
    if loss == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("dpo_losses(loss='ipo') needs chosen_tokens and rejected_tokens")
        averaged = chosen / chosen_tokens.clamp(min=1) - rejected / rejected_tokens.clamp(min=1)
        return (averaged - 1 / (2 * beta)) ** 2
    if loss == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise ValueError(f"unknown DPO loss {loss!r}")


def dpo_rewards(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The implicit rewards beta * (log pi - log pi_ref) of the chosen and the rejected completions (P,)."""
    return beta * (chosen_logps - ref_chosen_logps).detach(), beta * (rejected_logps - ref_rejected_logps).detach()


def group_advantages(rewards: torch.Tensor, group: int, scale: str = "group") -> torch.Tensor:
    """GRPO's advantages (N,) of rewards (N,) laid out in groups of `group` consecutive completions of one
    prompt: R - the group's mean, divided by (std + 1e-4) with scale=group (the group's std, Bessel-
    corrected as TRL's) or batch (the whole batch's), not divided with scale=none (Dr. GRPO)."""
    grouped = rewards.reshape(-1, group)
    advantages = (grouped - grouped.mean(dim=1, keepdim=True)).reshape(-1)
    if scale == "group":
        std = grouped.std(dim=1).repeat_interleave(group)
    elif scale == "batch":
        std = rewards.std().expand_as(rewards)
    elif scale == "none":
        return advantages
    else:
        raise ValueError(f"unknown reward scaling {scale!r}")
    return advantages / (std + STD_EPS)


def rloo_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """RLOO's advantages (N,): each reward minus the mean of the other group - 1 rewards of its prompt
    (the leave-one-out baseline, which leaves the REINFORCE gradient's expectation unchanged)."""
    grouped = rewards.reshape(-1, group)
    baseline = (grouped.sum(dim=1, keepdim=True) - grouped) / (group - 1)
    return (grouped - baseline).reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimate of KL(pi || pi_ref) per token: exp(r) - r - 1 with r = ref - logps
    (unbiased, always >= 0)."""
    r = ref_logps - logps
    return torch.exp(r) - r - 1


def clipped_objective(
    logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, epsilon: float, epsilon_high: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate per token (or per sequence), as a loss: -min(ratio A, clip(ratio, 1 - eps,
    1 + eps_high) A), ratio = exp(logps - old_logps); advantages broadcast (rows, 1) against (rows, T).
    Also returns where the clip is active (the ratio left the region on the side A pushes it)."""
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    active = ((ratio < 1 - epsilon) & (advantages < 0)) | ((ratio > 1 + epsilon_high) & (advantages > 0))
    return loss, active


def reduce_token_losses(per_token: torch.Tensor, mask: torch.Tensor, loss_type: str) -> torch.Tensor:
    """The numerator this micro-batch adds to the step's loss (0-dim), for loss_type:
      grpo:    sum over rows of each row's mean token loss           (denominator: the global batch's rows)
      dr_grpo: sum of the token losses                               (denominator: rows x max_new_tokens)
      dapo:    sum of the token losses                               (denominator: the global completion tokens)
    per_token, mask: (rows, T), mask 1 on completion tokens."""
    masked = per_token * mask
    if loss_type == "grpo":
        return (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
    if loss_type in ("dr_grpo", "dapo"):
        return masked.sum()
    raise ValueError(f"unknown loss_type {loss_type!r}")


def token_loss_denominator(mask: torch.Tensor, loss_type: str, max_new_tokens: int) -> torch.Tensor:
    """This rank's share of the denominator of reduce_token_losses (summed over ranks by the caller)."""
    rows = torch.tensor(float(mask.size(0)), device=mask.device)
    if loss_type == "grpo":
        return rows
    if loss_type == "dr_grpo":
        return rows * max_new_tokens
    if loss_type == "dapo":
        return mask.sum().to(torch.float32)
    raise ValueError(f"unknown loss_type {loss_type!r}")


LN2 = math.log(2)  # DPO's (sigmoid) loss when policy and reference agree: -log sigmoid(0)
