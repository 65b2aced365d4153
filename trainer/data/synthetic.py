"""A synthetic token stream with a known loss floor: a random first-order Markov chain.

Each row of the transition matrix P is drawn from a symmetric Dirichlet(concentration); small
concentrations give peaked rows, so there is structure to learn. The stream starts from the
stationary distribution pi, so it is stationary throughout, and the best possible next-token
loss of any model is the chain's entropy rate H = sum_i pi_i * H(P_i) nats per token.
"""

from __future__ import annotations

import bisect

import numpy as np


def markov_chain(vocab_size: int, concentration: float, rng: np.random.Generator) -> np.ndarray:
    """A (V, V) row-stochastic transition matrix with rows ~ Dirichlet(concentration)."""
    return rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size)


def stationary_distribution(transitions: np.ndarray) -> np.ndarray:
    """pi with pi P = pi and sum(pi) = 1 (unique: Dirichlet rows are positive almost surely)."""
    vocab_size = len(transitions)
    # Solve (P^T - I) pi = 0 together with 1^T pi = 1 as one least-squares system.
    system = np.vstack([transitions.T - np.eye(vocab_size), np.ones(vocab_size)])
    target = np.zeros(vocab_size + 1)
    target[-1] = 1.0
    pi = np.linalg.lstsq(system, target, rcond=None)[0]
    pi = np.clip(pi, 0.0, None)
    return pi / pi.sum()


def entropy_rate(transitions: np.ndarray) -> float:
    """H = sum_i pi_i * H(P_i) in nats: the expected loss of a model that knows P exactly."""
    p = transitions
    row_entropy = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)
    return float(stationary_distribution(p) @ row_entropy)


def sample_chain(transitions: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    """`length` states of the chain, the first drawn from the stationary distribution."""
    cumulative = np.cumsum(transitions, axis=1)
    cumulative[:, -1] = 1.0  # guard against rounding: every uniform draw < 1 lands in a row
    rows = cumulative.tolist()  # bisect on Python lists: ~0.2 us per step, no per-step numpy call
    uniforms = rng.random(length).tolist()
    start = np.cumsum(stationary_distribution(transitions))
    state = min(int(np.searchsorted(start, uniforms[0], side="right")), len(transitions) - 1)
    states = [state]
    for u in uniforms[1:]:
        state = bisect.bisect_right(rows[state], u)
        states.append(state)
    return np.asarray(states, dtype=np.int64)


def synthetic_stream(vocab_size: int, length: int, concentration: float, seed: int) -> tuple[np.ndarray, float]:
    """The synthetic source: (tokens (length,), entropy rate in nats), both fixed by `seed`."""
    rng = np.random.default_rng([seed % 2**64, 0x5EED])
    transitions = markov_chain(vocab_size, concentration, rng)
    return sample_chain(transitions, length, rng), entropy_rate(transitions)
