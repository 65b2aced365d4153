"""REINFORCE (the score-function estimator) made exact: a tiny GPT over a 3-token vocabulary writes
3-token completions after a one-token prompt, so its 27 sequences are enumerable and every expectation
over them is a finite sum. Through the harness's own pieces (GPT's token log-probs, losses.clipped_objective
at old_logps = logps.detach(), whose gradient is -A grad log p, and losses.reduce_token_losses) we check
that the policy gradient is E[R grad log p]; that RLOO's leave-one-out baseline keeps it unbiased while
GRPO's group mean shrinks it by (G - 1) / G; that the baseline lowers the variance; and that a sampled
estimate's error falls as 1 / sqrt(n). All in float64 (model.double())."""

from __future__ import annotations

import dataclasses
import itertools
import math

import pytest
import torch

from trainer.config import ModelConfig
from trainer.model import GPT
from trainer.objectives import losses

V, LENGTH, PROMPT = 3, 3, 0  # vocabulary, completion length, the prompt's one token
EPSILON = 0.2  # the clip range; at ratio 1 it changes nothing
SEQUENCES = torch.tensor(list(itertools.product(range(V), repeat=LENGTH)))  # (27, 3), every completion


def reward(sequences: torch.Tensor) -> torch.Tensor:
    """(N, 3) -> (N,): the count of token 2, plus 1.5 for a palindrome, minus 1 for a run of 0 0."""
    count = (sequences == 2).sum(dim=1).double()
    palindrome = (sequences[:, 0] == sequences[:, 2]).double()
    zeros = ((sequences[:, :-1] == 0) & (sequences[:, 1:] == 0)).any(dim=1).double()
    return count + 1.5 * palindrome - zeros


@pytest.fixture(scope="module")
def policy() -> GPT:
    """The tiny GPT in float64, its weights wide enough (init_std 0.5) that p(s) is far from uniform."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(
        ModelConfig(), vocab_size=V, vocab_multiple=1, n_layer=1, n_head=1, n_embd=8, block_size=8, init_std=0.5
    )
    return GPT(cfg).double()


def token_logps(model: GPT) -> torch.Tensor:
    """(27, 3) log p(token | prompt, previous tokens) of every completion, from GPT's token_logps."""
    prompt = torch.full((len(SEQUENCES), 1), PROMPT)
    idx = torch.cat([prompt, SEQUENCES[:, :-1]], dim=1)  # (27, 3): prompt, s1, s2 predict s1, s2, s3
    return model(idx, targets=SEQUENCES, token_logps=True)


def harness_loss(per_token_logps: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """The summed clipped-objective loss of rows (N, 3) with advantages (N,), at old = current log-probs:
    its gradient is -sum_i A_i grad log p(s_i), the REINFORCE estimate (negated, as a loss)."""
    per_token, _ = losses.clipped_objective(
        per_token_logps, per_token_logps.detach(), advantages[:, None], EPSILON, EPSILON
    )
    return losses.reduce_token_losses(per_token, torch.ones_like(per_token), "dapo")  # numerator: the plain sum


def flat_grad(loss: torch.Tensor, model: GPT, retain: bool = True) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(model.parameters()), retain_graph=retain)])


def ordered_groups(p: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 27^size ordered groups of independent draws: sequence indices (27^size, size), probabilities."""
    index = torch.tensor(list(itertools.product(range(len(p)), repeat=size)))
    return index, p[index].prod(dim=1)


def total_variance(probability: torch.Tensor, estimates: torch.Tensor) -> float:
    """trace Cov = E||g||^2 - ||E g||^2 of estimates (outcomes, P) drawn with `probability` (outcomes,)."""
    return (probability @ estimates.pow(2).sum(dim=1) - (probability @ estimates).pow(2).sum()).item()


@pytest.fixture(scope="module")
def exact(policy: GPT) -> dict[str, torch.Tensor]:
    """p (27,), R (27,), the exact gradient of E[R] = sum_s p(s) R(s) (autograd through the 27
    probabilities), and the score matrix S (27, P): row s is grad log p(s), through the harness's loss
    with a one-hot advantage (REINFORCE is linear in the advantages, so any estimate is weights @ S)."""
    logps = token_logps(policy)  # (27, 3)
    p = logps.sum(dim=1).exp()
    rewards = reward(SEQUENCES)
    gradient = flat_grad((p * rewards).sum(), policy)
    scores = torch.stack([-flat_grad(harness_loss(logps, torch.eye(len(p))[s].double()), policy) for s in range(27)])
    return dict(p=p.detach(), rewards=rewards, gradient=gradient, scores=scores, logps=logps)


def test_probabilities_are_a_distribution(exact):
    p = exact["p"]
    assert abs(p.sum().item() - 1) < 1e-12
    assert p.max() / p.min() > 3, "the policy is nearly uniform: the test would not tell estimators apart"


def test_reinforce_expectation_is_the_exact_gradient(policy, exact):
    """(a) sum_s p(s) R(s) grad log p(s), as one harness loss over all 27 rows with advantages p(s) R(s)."""
    estimate = -flat_grad(harness_loss(exact["logps"], exact["p"] * exact["rewards"]), policy)
    error = (estimate - exact["gradient"]).norm() / exact["gradient"].norm()
    print(f"REINFORCE over all 27 sequences vs exact: relative error {error:.2e}")
    assert error < 1e-6, f"relative error {error:.2e}"
    assert exact["gradient"].norm() > 1e-2  # a gradient that is there to match


def expected_group_gradient(policy: GPT, exact: dict, size: int, advantage) -> torch.Tensor:
    """E over all 27^size ordered groups (probability prod p) of the group's REINFORCE gradient
    (1/size) sum_i A_i grad log p(s_i), A = advantage(rewards (groups * size,), size): one harness
    loss whose rows are every group's samples, each advantage weighted by its group's probability."""
    index, probability = ordered_groups(exact["p"], size)  # (27^size, size), (27^size,)
    rows = index.reshape(-1)  # group after group, as the harness lays them out
    advantages = advantage(exact["rewards"][rows], size)
    weights = advantages * probability.repeat_interleave(size) / size
    return -flat_grad(harness_loss(exact["logps"][rows], weights), policy)


@pytest.mark.parametrize("size", [2, 3])
def test_rloo_is_unbiased_and_grpo_mean_is_biased(policy, exact, size):
    """(b) RLOO's leave-one-out baseline leaves the expected gradient exact. GRPO's baseline, the
    group's mean, includes the sample itself: A_i = (1 - 1/G) R_i - (1/G) sum_{j != i} R_j, and the
    others are independent of s_i, so the expected gradient is (G - 1) / G times the exact one
    (scale_rewards=none, Dr. GRPO); scale=group divides by the group's std, a different (biased)
    estimator: only finite here."""
    target = exact["gradient"]
    rloo = expected_group_gradient(policy, exact, size, losses.rloo_advantages)
    error = (rloo - target).norm() / target.norm()
    print(f"G={size}: RLOO vs exact, relative error {error:.2e}")
    assert error < 1e-6, f"RLOO, G={size}: relative error {error:.2e}"

    mean = expected_group_gradient(policy, exact, size, lambda r, g: losses.group_advantages(r, g, scale="none"))
    shrunk = (size - 1) / size * target
    error = (mean - shrunk).norm() / target.norm()
    print(f"G={size}: group mean vs (G-1)/G x exact, relative error {error:.2e}")
    assert error < 1e-6, f"GRPO group mean, G={size}: relative error {error:.2e} against (G-1)/G x exact"
    assert (mean - target).norm() / target.norm() > 0.1  # and so not the exact gradient

    scaled = expected_group_gradient(policy, exact, size, lambda r, g: losses.group_advantages(r, g, scale="group"))
    assert torch.isfinite(scaled).all() and scaled.norm() > 0


def test_baseline_lowers_the_variance(exact):
    """(c) The exact total variance (trace of the covariance) of one group's (G = 2) estimate
    (1/G) sum_i A_i grad log p(s_i), without a baseline (A = R) and with RLOO's, by enumeration."""
    size, p = 2, exact["p"]
    index, probability = ordered_groups(p, size)
    rewards = exact["rewards"][index.reshape(-1)]

    def estimates(advantages: torch.Tensor) -> torch.Tensor:  # every group's estimate, (27^size, P)
        return (advantages.reshape(-1, size, 1) * exact["scores"][index]).sum(dim=1) / size

    plain = total_variance(probability, estimates(rewards))
    rloo = total_variance(probability, estimates(losses.rloo_advantages(rewards, size)))
    single = total_variance(p, exact["scores"] * exact["rewards"][:, None])  # one draw's R(s) grad log p(s)
    assert abs(plain / (single / size) - 1) < 1e-9  # without a baseline: the mean of G iid estimates
    print(f"trace Cov, G={size}: no baseline {plain:.4g}, RLOO {rloo:.4g}, ratio {rloo / plain:.3f}")
    assert rloo < 0.7 * plain, f"trace Cov: no baseline {plain:.4g}, RLOO {rloo:.4g} (ratio {rloo / plain:.3f})"


def test_sampled_error_falls_as_one_over_sqrt_n(policy, exact):
    """(d) n sequences drawn from p (torch.multinomial, a seeded torch.Generator); the mean REINFORCE
    gradient's error against the exact gradient, as the root mean square over 300 repetitions (its
    square is exactly trace Cov / n), for n = 16 .. 1024: log-log slope -1/2, and each close to the
    exact sqrt(trace Cov / n). Each estimate is (counts / n) @ (R S), which for the first repetition is
    checked against the harness's loss over the n sampled rows."""
    generator = torch.Generator().manual_seed(0)
    p, rewards, target = exact["p"], exact["rewards"], exact["gradient"]
    single = exact["scores"] * rewards[:, None]  # (27, P): one draw's estimate R(s) grad log p(s)
    variance = total_variance(p, single)
    sizes, errors, repetitions = [16, 64, 256, 1024], [], 300
    for n in sizes:
        draws = torch.multinomial(p.expand(repetitions, -1), n, replacement=True, generator=generator)  # (reps, n)
        counts = torch.zeros(repetitions, 27, dtype=torch.float64)
        counts.scatter_add_(1, draws, torch.ones_like(draws, dtype=torch.float64))
        estimates = (counts / n) @ single  # (reps, P): each repetition's mean over its n draws
        if n == sizes[0]:
            harness = -flat_grad(harness_loss(exact["logps"][draws[0]], rewards[draws[0]] / n), policy)
            assert (harness - estimates[0]).norm() < 1e-10 * target.norm()
        errors.append((estimates - target).pow(2).sum(dim=1).mean().sqrt().item())
        expected = math.sqrt(variance / n)
        assert abs(errors[-1] / expected - 1) < 0.15, f"n={n}: RMS error {errors[-1]:.4g}, expected {expected:.4g}"
    x, y = torch.tensor(sizes).double().log(), torch.tensor(errors).log()
    slope = (((x - x.mean()) * (y - y.mean())).sum() / (x - x.mean()).pow(2).sum()).item()
    print(f"RMS errors {[f'{e:.4g}' for e in errors]} at n={sizes}: log-log slope {slope:.3f}")
    assert abs(slope + 0.5) < 0.1, f"log-log slope {slope:.3f}, errors {errors}"
