"""Run under torchrun by tests/test_distributed.py: the memory one rank needs to build a model.

    torchrun --nproc_per_node 2 tests/build_worker.py OUT.json STRATEGY

Builds a ~1 GB (fp32) GPT the loop's way (meta device, then the strategy shards and fills it) and
writes, per rank: the model's unsharded size, the peak resident set size before the build (after
a tiny warm-up build through the same path, so imports and process groups are counted there)
and after it.
"""

from __future__ import annotations

import json
import resource
import sys

from helpers import build

from trainer.config import Config, ModelConfig, ParallelConfig, TrainConfig
from trainer.model.build import build_model
from trainer.parallel.dist import exit_process

# 8 x 12 x 1600^2 + 8192 x 1600 (tied embedding) + positions: 259M parameters, 1.04 GB in fp32.
BIG = ModelConfig(vocab_size=8192, block_size=128, n_layer=8, n_head=16, n_embd=1600, bias=False)
TINY = ModelConfig(vocab_size=64, block_size=128, n_layer=1, n_head=2, n_embd=32, bias=False)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def config(strategy: str, model: ModelConfig) -> Config:
    return Config(model=model, parallel=ParallelConfig(strategy=strategy), train=TrainConfig(max_steps=1, seq_len=16))


if __name__ == "__main__":
    out, strategy_name = sys.argv[1], sys.argv[2]
    build(config(strategy_name, TINY))  # warm-up: imports, process group, lazy inits
    before = peak_rss()
    strategy = build(config(strategy_name, BIG))
    after = peak_rss()
    size = sum(p.numel() for p in build_model(BIG, seed=0)[0].parameters()) * 4  # fp32, on the meta device
    import torch.distributed as dist

    rows = [None] * strategy.world_size
    dist.all_gather_object(rows, {"rank": strategy.rank, "size": size, "before": before, "after": after})
    if strategy.rank == 0:
        with open(out, "w") as handle:
            json.dump(rows, handle)
    exit_process(0)  # as `python -m trainer` ends: no interpreter teardown under gloo's live threads
