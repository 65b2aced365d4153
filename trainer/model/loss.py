"""Token-level cross-entropy as a *sum*, so callers can normalise by a global token count."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value (padding, masked prompt tokens) carry no loss


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum over valid positions of -log softmax(logits)[target].

    logits: (B, T, V), any float dtype (half precision is upcast to fp32 here); targets: (B, T) with
    IGNORE_INDEX at positions that carry no loss. Returns a 0-dim fp32 tensor.
    Dividing by the number of valid targets in the *whole* accumulated (and, with several
    ranks, global) batch, rather than per micro-batch, is what makes accumulation exact.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
