"""Packed fixed-length sequences: a split's token stream cut into non-overlapping windows.

Sample i of a split is tokens[i*T : i*T + T + 1] for T = seq_len: its first T tokens are the
input x and its last T the next-token targets y. Documents run across windows, joined by the
end-of-text id, as in GPT-2's training data; no token is padding.
"""

from __future__ import annotations

import numpy as np
import torch

from trainer.data.sampler import Sampler


class PackedSplit:
    """One split (train or validation) of the token stream, addressed by sample index."""

    all_targets = True  # every target counts toward the loss? (windows of a token stream: no masked or padded targets)

    def __init__(self, tokens: np.ndarray, seq_len: int):
        self.tokens = tokens  # (num_tokens,) memmap or array of ids
        self.seq_len = seq_len

    def __len__(self) -> int:
        """Number of samples: windows of seq_len + 1 tokens that start every seq_len tokens."""
        return max(len(self.tokens) - 1, 0) // self.seq_len

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    def sampler(self, seed: int) -> Sampler:
        """The order the loop draws this split's samples in: seeded epochs of shuffled indices."""
        return Sampler(len(self), seed)

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` as (x, y), both int64 of shape (B, T): y[:, t] is the token that
        follows x[:, t] in the stream, so y[:, :-1] == x[:, 1:]."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"sample indices must be a 1-D array in [0, {len(self)})")
        offsets = indices[:, None] * self.seq_len + np.arange(self.seq_len + 1)  # (B, T+1)
        windows = torch.from_numpy(np.asarray(self.tokens[offsets], dtype=np.int64))
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
