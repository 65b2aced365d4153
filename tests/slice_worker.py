"""Run under torchrun by tests/test_pretrained_slices.py: build parallel=STRATEGY from a local Hugging Face
checkpoint and report the bytes this rank read from it (trainer.model.hf_import.BYTES_READ) and, on rank 0,
the whole model's weights gathered again.

    torchrun --nproc_per_node 4 tests/slice_worker.py OUT.pt CHECKPOINT_DIR STRATEGY
    torchrun --nproc_per_node 4 tests/slice_worker.py OUT.pt random STRATEGY   (a seeded random init instead:
                                                                                 the elements each rank drew)
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from helpers import build

from trainer.config import Config, ModelConfig, ParallelConfig, TrainConfig
from trainer.model import gpt, hf_import
from trainer.parallel.dist import exit_process
from trainer.preflight import resolve_model_config

# a random init (path "random") whose matrices span several blocks of gpt.INIT_ROWS rows
RANDOM = ModelConfig(vocab_size=2048, n_embd=256, n_head=4, n_layer=2, intermediate_size=1024, block_size=64)

if __name__ == "__main__":
    out, path, strategy = sys.argv[1:4]
    model = RANDOM if path == "random" else resolve_model_config(ModelConfig(pretrained=path), tokenizer_vocab=1)
    cfg = Config(
        model=model,
        parallel=ParallelConfig(strategy=strategy),
        train=TrainConfig(micro_batch_size=1, seq_len=8, max_steps=1),
    )
    built = build(cfg)
    read, drawn = [None] * dist.get_world_size(), [None] * dist.get_world_size()
    dist.all_gather_object(read, hf_import.BYTES_READ)
    dist.all_gather_object(drawn, gpt.INIT_DRAWN)
    weights = built.full_state_dict()  # collective
    if dist.get_rank() == 0:
        torch.save({"bytes_read": read, "init_drawn": drawn, "weights": weights}, out)
    dist.barrier()
    exit_process(0)
