"""Pretrained checkpoints at scale: under FSDP2 each rank reads only the rows of each tensor that its shard
holds (safetensors slices through trainer.model.hf_import.CheckpointTensor), not every shard of the
checkpoint. Measured: the bytes each of 4 ranks reads from an 8-file checkpoint, against the whole; the
weights gathered again are the checkpoint's exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import hf_llama, torchrun

from trainer.model import load_hf_config
from trainer.model.hf_import import hf_to_trainer, pretrained_weights, read_hf_tensors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sliced") / "llama"
    torch.manual_seed(0)
    hf_llama(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4).save_pretrained(
        path, max_shard_size="100KB"
    )
    return path


def test_rows_read_through_slices_equal_the_whole_tensor(checkpoint: Path) -> None:
    """Every tensor kind (as is, q/k/v concatenated, padded vocabulary rows) in ranges that cross pieces."""
    cfg = load_hf_config(checkpoint)
    eager = dict(pretrained_weights(checkpoint, cfg))
    for name, lazy in pretrained_weights(checkpoint, cfg, lazy=True):
        want = eager[name]
        assert lazy.shape == tuple(want.shape) and torch.equal(lazy.full(), want), name
        n = want.shape[0]
        for start, stop in ((0, 1), (n // 3, 2 * n // 3 + 1), (n - 1, n), (n // 2, n + 5)):
            assert torch.equal(lazy.rows(start, stop), want[start:stop]), (name, start, stop)


@pytest.mark.slow  # 4 processes on 2 cores
def test_each_of_four_fsdp_ranks_reads_a_quarter_of_an_8_file_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    files = sorted(checkpoint.glob("*.safetensors"))
    assert len(files) == 8, [f.name for f in files]
    tensors = read_hf_tensors(checkpoint)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    out = tmp_path / "out.pt"
    done = torchrun(str(REPO / "tests" / "slice_worker.py"), str(out), str(checkpoint), "fsdp", cwd=REPO, nproc=4)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(out, weights_only=True)
    want = hf_to_trainer(tensors, load_hf_config(checkpoint))
    assert result["weights"].keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(result["weights"][key], tensor.float()), key
    read = result["bytes_read"]
    print(json.dumps({"files": len(files), "checkpoint_bytes": total, "bytes_read_per_rank": read}))
    assert sum(read) == total  # every byte read once, by one rank (FSDP2 shards every tensor's rows)
    assert max(read) <= total / 4 * 1.1, (read, total)  # a quarter each, up to uneven row splits


@pytest.mark.slow  # 4 processes on 2 cores
def test_each_of_four_fsdp_ranks_draws_its_own_rows_of_a_random_init(tmp_path: Path) -> None:
    """A seeded random init is drawn in blocks of INIT_ROWS rows, each from its own generator: an FSDP2 shard
    draws the blocks its rows overlap, and the values gathered again are the ones one process draws."""
    from slice_worker import RANDOM

    from trainer.model.gpt import GPT

    with torch.device("meta"):
        model = GPT(RANDOM)
    want = dict(model.initial_weights(seed=0))  # helpers.build draws from seed 0
    total = sum(t.numel() for t in want.values())
    out = tmp_path / "out.pt"
    done = torchrun(str(REPO / "tests" / "slice_worker.py"), str(out), "random", "fsdp", cwd=REPO, nproc=4)
    assert done.returncode == 0, done.stderr[-4000:]
    result = torch.load(out, weights_only=True)
    assert result["weights"].keys() == want.keys()
    for key, tensor in want.items():
        assert torch.equal(result["weights"][key], tensor), key
    drawn = result["init_drawn"]
    print(json.dumps({"init_elements": total, "drawn_per_rank": drawn}))
    assert max(drawn) <= total / 4 * 1.2, (drawn, total)  # a quarter each, up to blocks two shards share
