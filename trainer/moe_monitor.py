"""The expert load of a mixture-of-experts model's sparse blocks, and a collapsed router flagged.

    each micro-batch  ExpertLoad.add: each sparse block's routing (SparseMLP.last_topk, (N, k)) scattered
                      into token-slot counts per expert, (blocks, E), and the model's moe_aux_loss added,
                      on the device: no host sync
    a logged step     ExpertLoad.metrics: counts and losses summed over ranks in one all-reduce, read
                      back in one host sync -> moe/aux_loss (the mean over the step's micro-batches and
                      ranks), moe/load_max/block.N, moe/collapsed, and on monitor steps moe/load/block.N

A block's load is its experts' shares of the step's token slots (k per token, over every
micro-batch of every rank: the global batch), summing to 1; load_max is the busiest share over the
mean share 1 / E (trainer.model.moe.load_max): 1 is balanced, E / k the most there can be, every
token choosing the same k experts.

Collapse: a block is flagged when its busiest expert is among the k chosen by at least
monitor.moe_collapse_share of the step's tokens (its share of the slots x k, i.e. load_max x k / E).
Balanced routing gives k / E; one expert in every token gives 1, the most there is, whatever E and
k, so one threshold (default 0.9: "nearly every token goes to the same expert") means the same for
every model. Where k = E every token reaches every expert and nothing can collapse: no flag.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.config import ConfigError
from trainer.model.moe import SparseMLP

if TYPE_CHECKING:
    from trainer.parallel.base import Strategy

log = logging.getLogger("trainer")


def sparse_blocks(model: nn.Module) -> list[tuple[int, SparseMLP]]:
    """(block index, its SparseMLP) in model order; wrappers (activation checkpointing) may sit between."""
    found = []
    for name, module in model.named_modules():
        if isinstance(module, SparseMLP):
            found.append((int(re.search(r"(?:^|\.)blocks\.(\d+)\.", name)[1]), module))
    return sorted(found, key=lambda pair: pair[0])


class ExpertWatch:
    """A model's sparse blocks, and the blocks found collapsed at the last logged step."""

    def __init__(self, model: nn.Module, collapse_share: float) -> None:
        found = sparse_blocks(model)
        self.model, self.collapse_share = model, collapse_share
        self.blocks, self.mlps = [i for i, _ in found], [m for _, m in found]
        self.n_experts, self.top_k = self.mlps[0].n_experts, self.mlps[0].top_k
        self.collapsed: dict[int, int] = {}  # block -> its busiest expert, as of the last logged step

    @classmethod
    def of(cls, model: nn.Module, collapse_share: float) -> ExpertWatch | None:
        """The watch of a model with sparse blocks (None for a dense one). A threshold that balanced
        routing already reaches would flag every block: refused, naming the setting."""
        if not sparse_blocks(model):
            return None
        watch = cls(model, collapse_share)
        balanced = watch.top_k / watch.n_experts
        if balanced < 1 and collapse_share <= balanced:
            raise ConfigError(
                f"monitor.moe_collapse_share={collapse_share:g} is at or below balanced routing's share "
                f"k / E = {watch.top_k}/{watch.n_experts}: every block would be flagged; set it above "
                f"{balanced:g} (at most 1)"
            )
        rule = "off (k = E)" if balanced == 1 else f"share of tokens >= {collapse_share:g} (monitor.moe_collapse_share)"
        log.info(
            f"expert load: {len(watch.blocks)} sparse blocks of {watch.n_experts} experts, top {watch.top_k}; "
            f"a block's busiest expert is flagged as collapsed at a {rule}, balanced routing gives {balanced:.3g}"
        )
        return watch

    def start(self) -> ExpertLoad:
        """A step's empty counts, on the model's device."""
        return ExpertLoad(self)


class ExpertLoad:
    """One step's expert load, on the device: token slots per (sparse block, expert) and the sum of
    its micro-batches' load-balancing losses."""

    def __init__(self, watch: ExpertWatch) -> None:
        device = watch.mlps[0].router.weight.device
        self.watch = watch
        self.counts = torch.zeros(len(watch.mlps) * watch.n_experts, dtype=torch.int64, device=device)  # (L E,)
        self.aux_sum = torch.zeros((), device=device)
        self.micro_batches = 0

    def add(self) -> None:
        """After a micro-batch's forward: its routing and load-balancing loss (device work, no host sync)."""
        w = self.watch
        slots = torch.cat([m.last_topk.flatten() + j * w.n_experts for j, m in enumerate(w.mlps)])  # (L N k,)
        self.counts.scatter_add_(0, slots, torch.ones_like(slots))  # not bincount: on CUDA it syncs for its size
        if (aux := getattr(w.model, "moe_aux_loss", None)) is not None:  # GPT's, of this forward
            self.aux_sum += aux.float()
        self.micro_batches += 1

    def metrics(self, strategy: Strategy, step: int, shares: bool) -> tuple[dict[str, Any], str | None]:
        """moe/* of the step, over every rank (collective: all ranks log the same steps), and a
        warning line naming each block that collapsed since the last logged step (None: none did).
        shares: also every expert's share, moe/load/block.N (a list of E; monitor steps)."""
        w, E = self.watch, self.watch.n_experts
        packed = torch.cat([self.counts.double(), self.aux_sum.double()[None]])  # float64: counts exact past 2^24
        *counts, aux_sum = strategy.all_reduce_sum(packed, "expert load").tolist()  # collective; host sync
        metrics: dict[str, Any] = {"moe/aux_loss": aux_sum / (self.micro_batches * strategy.world_size)}
        loads, collapsed = {}, {}
        for j, block in enumerate(w.blocks):
            row = counts[j * E : (j + 1) * E]
            total = sum(row)  # the step's tokens x k
            share = [c / total for c in row]  # (E,) of this block's token slots, summing to 1
            busiest = max(range(E), key=share.__getitem__)
            metrics[f"moe/load_max/block.{block}"] = share[busiest] * E
            loads[f"moe/load/block.{block}"] = [float(f"{s:.6g}") for s in share]
            if w.top_k < E and share[busiest] * w.top_k >= w.collapse_share:
                collapsed[block] = busiest
        metrics["moe/collapsed"] = len(collapsed)
        if shares:
            metrics.update(loads)
        new = {b: e for b, e in collapsed.items() if w.collapsed.get(b) != e}
        w.collapsed = collapsed
        if not new:
            return metrics, None
        what = ", ".join(
            f"block.{b} routes {metrics[f'moe/load_max/block.{b}'] * w.top_k / E:.1%} of its tokens to expert {e}"
            for b, e in new.items()
        )
        hint = "" if w.model.cfg.router_aux_loss_coef else "; model.router_aux_loss_coef=0: no loss balances the load"
        warning = f"expert collapse at step {step}: {what} (monitor.moe_collapse_share={w.collapse_share:g}){hint}"
        return metrics, warning
