"""Token-level cross-entropy as a *sum*, so callers can normalise by a global token count.

Two paths to the same number:
  cross_entropy_sum(logits, targets)                       the head's (B, T, V) logits given
  linear_cross_entropy_sum(hidden, weight, targets, chunk)  head matmul + loss fused over chunks
                                                           of tokens: the (B*T, V) fp32 logits
                                                           are never materialised at once
Both take `vocab`, the real vocabulary of a head whose rows are padded (model.vocab_multiple): the
logits of columns vocab.. are -inf, so the loss and every gradient are the unpadded head's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # targets with this value (padding, masked prompt tokens) carry no loss


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
    """Sum over valid positions of -log softmax(logits)[target].

    logits: (B, T, V), any float dtype (half precision is upcast to fp32 here); targets: (B, T) with
    IGNORE_INDEX at positions that carry no loss. Returns a 0-dim fp32 tensor.
    Dividing by the number of valid targets in the *whole* accumulated (and, with several
    ranks, global) batch, rather than per micro-batch, is what makes accumulation exact.
    vocab: columns vocab.. of logits are padding; they are set to -inf *in place* (see below).
    """
    if vocab is not None and vocab < logits.size(-1):
        # Only the (B, T, V - vocab) padding columns are written, outside autograd: an autograd-
        # recorded fill (or slicing the real columns) would copy the whole (B, T, V) gradient in
        # backward (slicing: the logits in forward too). Exact all the same: cross-entropy's
        # gradient at a -inf logit is softmax = exp(-inf) = 0, which is the masked model's. No
        # backward needs the head's output (linear saves its inputs), so changing it is safe.
        with torch.no_grad():
            logits[..., vocab:] = float("-inf")
    return F.cross_entropy(
        logits.reshape(-1, logits.size(-1)).to(torch.promote_types(logits.dtype, torch.float32)),
        targets.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def linear_cross_entropy_sum(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_size: int, vocab: int | None = None
) -> torch.Tensor:
    """cross_entropy_sum(F.linear(hidden, weight), targets, vocab), chunk_size tokens at a time.

    hidden: (N, C) or (B, T, C); weight: (V, C), a bias-free head (rows vocab.. padding, their
    logits -inf); targets: hidden's leading shape, IGNORE_INDEX where there is no loss. Returns a
    0-dim fp32 (fp64 for fp64 inputs) sum.

    Precision mirrors the plain path: the matmuls run in the autocast dtype when autocast is on
    (else in the inputs' dtype); logsumexp, softmax, the loss and the weight gradient's sum over
    chunks run in (at least) fp32. The gradients are computed during forward, one chunk at a
    time, and only scaled by the incoming gradient in backward (as Liger-Kernel's fused linear
    cross-entropy), so the extra memory is one (chunk, V) block of logits plus an fp32 (V, C)
    weight gradient and (N, C) hidden gradient, instead of several (N, V) fp32 tensors.
    """
    if chunk_size <= 0:
        raise ValueError(f"linear_cross_entropy_sum: chunk_size must be > 0, got {chunk_size}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and targets {tuple(targets.shape)} disagree")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, chunk_size, compute_dtype, vocab)
    loss, _, _ = _chunked_loss_and_grads(hidden, weight, targets, chunk_size, compute_dtype, False, False, vocab)
    return loss


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Autograd node of linear_cross_entropy_sum (call that instead: it picks the dtypes)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, compute_dtype, vocab):
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        loss, grad_hidden, grad_weight = _chunked_loss_and_grads(
            hidden, weight, targets, chunk_size, compute_dtype, need_hidden, need_weight, vocab
        )
        ctx.save_for_backward(grad_hidden, grad_weight)  # unscaled, fp32; freed after backward
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        # d loss / d input is linear in the scalar grad_output. Scale in place, so the (V, C)
        # gradient is not copied, unless this graph is kept for another backward
        # (retain_graph=True, gradcheck), which must find the stored gradients unscaled. The
        # query is private (AOTAutograd uses it for the same purpose); without it, copy.
        keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", lambda: True)()
        scale = torch.mul if keep_graph else torch.Tensor.mul_
        if grad_hidden is not None:
            grad_hidden = scale(grad_hidden, grad_output).to(ctx.hidden_dtype)
        if grad_weight is not None:
            grad_weight = scale(grad_weight, grad_output).to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None, None


@torch.no_grad()
def _chunked_loss_and_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int,
    compute_dtype: torch.dtype,
    need_hidden: bool,
    need_weight: bool,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(loss sum, d loss / d hidden, d loss / d weight), the gradients None unless needed."""
    acc_dtype = torch.promote_types(compute_dtype, torch.float32)  # softmax, loss, grad sums
    shape = hidden.shape
    h = hidden.reshape(-1, shape[-1])  # (N, C)
    t = targets.reshape(-1)  # (N,)
    with torch.autocast(hidden.device.type, enabled=False):  # dtypes are chosen explicitly here
        w = weight.to(compute_dtype)  # (V, C); one copy under autocast, as F.linear would make
        loss = torch.zeros((), dtype=acc_dtype, device=h.device)
        grad_h = torch.empty(h.shape, dtype=acc_dtype, device=h.device) if need_hidden else None
        grad_w = torch.zeros(w.shape, dtype=acc_dtype, device=w.device) if need_weight else None
        for start in range(0, h.size(0), chunk_size):
            rows = slice(start, start + chunk_size)
            h_c = h[rows].to(compute_dtype)  # (n, C)
            loss_c, dlogits = _chunk_loss_and_dlogits(h_c, w, t[rows], acc_dtype, need_hidden or need_weight, vocab)
            loss += loss_c
            if need_hidden:
                grad_h[rows] = dlogits @ w  # (n, C)
            if need_weight:
                if compute_dtype == acc_dtype:
                    grad_w.addmm_(dlogits.T, h_c)  # (V, C), no temporary
                else:
                    grad_w += dlogits.T @ h_c  # half-precision product, summed over chunks in fp32
            del dlogits  # before the next chunk's logits exist: one (n, V) block at a time
    return loss, None if grad_h is None else grad_h.view(shape), grad_w


def _chunk_loss_and_dlogits(
    h_c: torch.Tensor,
    w: torch.Tensor,
    t_c: torch.Tensor,
    acc_dtype: torch.dtype,
    with_grad: bool,
    vocab: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk: (loss sum, d loss / d logits (n, V) in w's dtype, or None without with_grad)."""
    ignored = t_c == IGNORE_INDEX  # (n,)
    t_c = t_c.masked_fill(ignored, 0)  # any valid index: those rows are zeroed below
    logits = (h_c @ w.T).to(acc_dtype)  # (n, V): the only vocabulary-sized tensor
    if vocab is not None:
        logits[:, vocab:] = float("-inf")  # padding columns (only those written): exp gives 0, so no loss, no gradient
    # logsumexp by hand and in place, so no second (n, V) tensor: shift by the row max (exp
    # cannot overflow), exponentiate, sum; loss = log(sum) - shifted target logit.
    logits -= logits.amax(dim=-1, keepdim=True)
    target_logit = logits.gather(1, t_c[:, None]).squeeze(1)  # (n,)
    exp_logits = logits.exp_()
    total = exp_logits.sum(dim=-1, keepdim=True)  # (n, 1)
    loss = (total.squeeze(1).log() - target_logit).masked_fill(ignored, 0).sum()
    if not with_grad:
        return loss, None
    # d loss / d logits = softmax(logits) - onehot(target), zero on ignored rows; in place.
    dlogits = exp_logits.div_(total)
    dlogits.scatter_add_(1, t_c[:, None], torch.full_like(total, -1.0))
    dlogits.masked_fill_(ignored[:, None], 0.0)
    return loss, dlogits.to(w.dtype)


def target_logps(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_size: int = 0,
    vocab: int | None = None,
    cap: float | None = None,
) -> torch.Tensor:
    """Each target's log-probability under the head: (B, T) fp32, log softmax(cap(hidden W^T))[target]
    where targets is not IGNORE_INDEX, 0 elsewhere. The log-softmax runs in fp32 whatever the matmul's
    dtype (half-precision log-probs give NaN rewards in DPO: trl #878).

    hidden: (B, T, C); weight: (V, C), rows vocab.. padding (left out). chunk_size > 0: the head and
    the log-softmax run chunk_size tokens at a time, each chunk recomputed in backward (activation
    checkpointing), so only one (chunk, V) block of fp32 logits lives at once instead of (B*T, V).
    """
    weight = weight if vocab is None else weight[:vocab]
    B, T, C = hidden.shape
    flat, goal = hidden.reshape(B * T, C), targets.reshape(B * T)

    def piece(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, weight)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return -F.cross_entropy(logits, t, ignore_index=IGNORE_INDEX, reduction="none")  # 0 at IGNORE_INDEX

    if chunk_size <= 0 or B * T <= chunk_size:
        return piece(flat, goal).reshape(B, T)
    from torch.utils.checkpoint import checkpoint

    parts = []
    for start in range(0, B * T, chunk_size):
        h, t = flat[start : start + chunk_size], goal[start : start + chunk_size]
        recompute = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
        parts.append(checkpoint(piece, h, t, use_reentrant=False) if recompute else piece(h, t))
    return torch.cat(parts).reshape(B, T)
