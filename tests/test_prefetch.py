"""The prefetcher: the same batches, in the same order, as reading each one when asked, with the
sampler (what checkpoints save) never ahead of the loop; errors surface on the main thread."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import env, read_metrics

from trainer.__main__ import compose_config
from trainer.data import ExampleSplit, PackedSplit, shard_for_rank
from trainer.data.examples import ExampleCache
from trainer.data.prefetch import Prefetcher
from trainer.data.sampler import SequentialSampler
from trainer.data.streaming import StreamingSplit
from trainer.data.tokenizer import ByteTokenizer

GLOBAL_BATCH = 6  # 3 rows on each of 2 ranks


def packed_split() -> PackedSplit:
    """50 windows of 8 tokens: a global batch of 6 runs out of an epoch every 8-9 batches."""
    return PackedSplit(np.random.default_rng(0).integers(0, 97, 401, dtype=np.int64), 8)


def example_split() -> ExampleSplit:
    """30 examples of 2-9 tokens (targets: the second half of each) packed into rows of 12 tokens,
    with positions (document masking)."""
    rng = np.random.default_rng(1)
    lengths = rng.integers(2, 10, 30)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    ids = rng.integers(0, 50, int(offsets[-1])).astype(np.int64)
    targets = np.concatenate([np.arange(n) >= n // 2 for n in lengths]).astype(np.uint8)
    counts = np.array([targets[s + 1 : e].sum() for s, e in zip(offsets[:-1], offsets[1:], strict=True)])
    cache = ExampleCache(Path("."), ids, targets, offsets, counts.astype(np.int64), {}, hit=True)
    return ExampleSplit(cache, 0, 30, 12, packing=True, document_mask=True, pad_id=0)


def plain_batches(split, sampler, rank: int, steps: int) -> list[tuple[torch.Tensor, ...]]:
    """What the loop read before prefetching: draw, keep this rank's shard, read."""
    return [split.get_batch(shard_for_rank(sampler.next_global_batch(GLOBAL_BATCH), rank, 2)) for _ in range(steps)]


def assert_batches_equal(got: tuple, expected: tuple) -> None:
    x, y, positions = got
    assert len(expected) == (3 if positions is not None else 2)
    for a, b in zip((x, y, positions), expected, strict=False):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("make_split", [packed_split, example_split], ids=["packed", "examples"])
@pytest.mark.parametrize("prefetch", [True, False])
def test_batches_and_sampler_state_equal_the_plain_path(make_split, prefetch: bool) -> None:
    split, steps = make_split(), 25  # about 3 epochs: reshuffled orders included
    for rank in (0, 1):
        reference_sampler = split.sampler(7)
        expected = plain_batches(split, reference_sampler, rank, steps)
        sampler = split.sampler(7)
        batches = Prefetcher(split, sampler, GLOBAL_BATCH, rank=rank, world_size=2, enabled=prefetch)
        try:
            for step in range(steps):
                assert_batches_equal(batches.next(), expected[step])
                # The sampler is exactly where the plain path's is: never ahead of the loop.
                assert sampler.state_dict() == _after(split, step + 1)
            assert sampler.state_dict() == reference_sampler.state_dict()
            assert sampler.epoch >= 2
            assert (batches.hits, batches.misses) == ((steps - 1, 1) if prefetch else (0, steps))
        finally:
            batches.close()


def _after(split, steps: int, seed: int = 7) -> dict:
    """The state of a fresh sampler of `split` (seeded `seed`) after `steps` global batches."""
    sampler = split.sampler(seed)
    for _ in range(steps):
        sampler.next_global_batch(GLOBAL_BATCH)
    return sampler.state_dict()


def test_the_ranks_shards_make_up_the_global_batch() -> None:
    split = example_split()
    expected = plain_batches(split, split.sampler(3), 0, 1)[0], plain_batches(split, split.sampler(3), 1, 1)[0]
    whole = split.get_batch(split.sampler(3).next_global_batch(GLOBAL_BATCH))
    got = []
    for rank in (0, 1):
        batches = Prefetcher(split, split.sampler(3), GLOBAL_BATCH, rank=rank, world_size=2)
        got.append(batches.next())
        batches.close()
        assert_batches_equal(got[rank], expected[rank])
    for i in range(3):  # x, y, positions: rank 0's rows then rank 1's are the global batch
        torch.testing.assert_close(torch.cat([got[0][i], got[1][i]]), whole[i], rtol=0, atol=0)


def test_a_sampler_loaded_mid_run_is_followed() -> None:
    """A checkpoint loaded into the sampler (resume) after the read-ahead began: the read-ahead is
    dropped and the batch the sampler now names is returned, then prefetching goes on from there."""
    split = packed_split()
    sampler = split.sampler(5)
    batches = Prefetcher(split, sampler, GLOBAL_BATCH, rank=1, world_size=2)
    for _ in range(3):
        batches.next()
    earlier = json.loads(json.dumps(sampler.state_dict()))
    expected = plain_batches(split, split.sampler(5), 1, 20)
    for _ in range(10):  # into the next epoch
        batches.next()
    sampler.load_state_dict(earlier)  # back to step 3, as a resume from that checkpoint does
    for step in range(3, 8):
        assert_batches_equal(batches.next(), expected[step])
    assert sampler.state_dict() == _after(split, 8, seed=5)
    later = _after(split, 15, seed=5)
    sampler.load_state_dict(later)  # and forward
    assert_batches_equal(batches.next(), expected[15])
    assert_batches_equal(batches.next(), expected[16])
    assert (batches.hits, batches.misses) == (17, 3)  # a miss at the start and after each load, else hits
    batches.close()


def test_loading_a_checkpoint_before_the_first_batch_reads_from_it() -> None:
    split = example_split()
    state = _after(split, 4)
    sampler = split.sampler(7)
    sampler.load_state_dict(state)
    expected = plain_batches(split, split.sampler(7), 0, 7)[4:]
    batches = Prefetcher(split, sampler, GLOBAL_BATCH, rank=0, world_size=2)
    for batch in expected:
        assert_batches_equal(batches.next(), batch)
    assert (batches.hits, batches.misses) == (2, 1)
    batches.close()


class Recording:
    """A split that records each read (its indices and thread) and fails when two reads overlap."""

    def __init__(self, split, fail_at: int | None = None):
        self.split, self.fail_at = split, fail_at
        self.reads: list[tuple[list[int], str]] = []
        self.busy = threading.Lock()

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        assert self.busy.acquire(blocking=False), "two reads of the split overlapped"
        try:
            self.reads.append((indices.tolist(), threading.current_thread().name))
            if self.fail_at is not None and self.fail_at in indices.tolist():
                raise ValueError(f"sample {self.fail_at} is corrupt (read on {threading.current_thread().name})")
            return self.split.get_batch(indices)
        finally:
            self.busy.release()


def test_a_streamed_split_is_read_in_order_one_batch_ahead() -> None:
    """StreamingSplit tokenizes as it is read: each rank's reads come in the sampler's order, never
    two at once, and give the batches of reading without prefetch."""
    texts = [f"document {i}: " + "xy" * (i % 7) + "\n" for i in range(40)]

    def stream() -> StreamingSplit:
        return StreamingSplit(lambda: texts, ByteTokenizer(), 8, shuffle_buffer=5, seed=2, chunk_documents=3)

    for rank in (0, 1):
        expected = plain_batches(stream(), SequentialSampler(), rank, 30)
        split = Recording(stream())
        batches = Prefetcher(split, SequentialSampler(), GLOBAL_BATCH, rank=rank, world_size=2)
        for step in range(30):
            assert_batches_equal(batches.next(), expected[step])
        batches.close()
        first_rows = [indices[0] for indices, _ in split.reads]
        assert first_rows == [step * GLOBAL_BATCH + 3 * rank for step in range(31)]  # 30 taken + 1 ahead
        assert [thread for _, thread in split.reads[1:]] == ["trainer-prefetch"] * 30
        assert split.split.epoch >= 1  # the stream went round its documents at least once


def test_an_error_in_the_thread_surfaces_on_the_main_thread() -> None:
    split = Recording(PackedSplit(np.arange(401, dtype=np.int64), 8), fail_at=40)
    sampler = SequentialSampler()  # batch k holds samples 6k .. 6k+5: sample 40 is in batch 6
    batches = Prefetcher(split, sampler, GLOBAL_BATCH)
    for _ in range(6):
        batches.next()
    with pytest.raises(ValueError, match=r"^sample 40 is corrupt \(read on trainer-prefetch\)$"):
        batches.next()
    assert sampler.state_dict()["position"] == 42  # as when the plain path's read raises
    batches.close()


def test_an_error_in_a_dropped_read_ahead_is_not_raised() -> None:
    """The failing batch is read ahead, then the sampler is loaded elsewhere: nothing is raised."""
    split = Recording(PackedSplit(np.arange(401, dtype=np.int64), 8), fail_at=40)
    sampler = SequentialSampler()
    batches = Prefetcher(split, sampler, GLOBAL_BATCH)
    for _ in range(6):
        batches.next()  # the thread is now reading batch 6, which fails
    sampler.load_state_dict({"kind": "sequential", "position": 0})
    x, y, positions = batches.next()
    assert x[:, 0].tolist() == [0, 8, 16, 24, 32, 40] and positions is None
    batches.close()


def test_close_stops_the_thread() -> None:
    split = packed_split()
    batches = Prefetcher(split, split.sampler(0), GLOBAL_BATCH)
    thread = batches._worker.thread
    assert thread.daemon and thread.is_alive()
    batches.next()
    batches.close()
    batches.close()  # twice is harmless
    assert not thread.is_alive()
    with pytest.raises(RuntimeError, match="closed"):
        batches.next()
    plain = Prefetcher(split, split.sampler(0), GLOBAL_BATCH, enabled=False)
    assert plain._worker is None  # no thread when prefetching is off
    plain.close()


def test_exit_with_a_read_ahead_in_flight_is_clean(tmp_path: Path) -> None:
    """A run that ends without close() (an exception in the loop) still exits at once, status 0."""
    script = (
        "import numpy as np, time\n"
        "from trainer.data import PackedSplit, Sampler\n"
        "from trainer.data.prefetch import Prefetcher\n"
        "class Slow(PackedSplit):\n"
        "    def get_batch(self, indices):\n"
        "        time.sleep(0.5)\n"
        "        return super().get_batch(indices)\n"
        "split = Slow(np.arange(401, dtype=np.int64), 8)\n"
        "batches = Prefetcher(split, Sampler(len(split), 0), 6)\n"
        "print(batches.next()[0].shape[0])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "6"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_batches_are_pinned_then_copied_asynchronously() -> None:
    split = example_split()
    expected = plain_batches(split, split.sampler(7), 1, 5)
    batches = Prefetcher(split, split.sampler(7), GLOBAL_BATCH, rank=1, world_size=2, device="cuda")
    for step in range(5):
        got = batches.next()
        assert all(t.is_cuda for t in got)
        assert_batches_equal(tuple(t.cpu() for t in got), expected[step])
        assert all(t.is_pinned() for t in batches.pending.result().tensors)  # the read-ahead, in pinned memory
    batches.close()


def test_a_run_with_and_without_prefetch_gives_identical_losses(quick: list[str], tmp_path: Path) -> None:
    """Both runs at once (2 cores): the same losses to the last bit, and the data wait is logged."""
    args = [*quick, "train.max_steps=6", "train.log_interval=1", "logger.progress_bar=false"]

    def launch(flag: str) -> subprocess.Popen:
        command = [sys.executable, "-m", "trainer", *args, f"data.prefetch={flag}", f"hydra.run.dir={tmp_path / flag}"]
        return subprocess.Popen(
            command, cwd=tmp_path, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )

    launched = {flag: launch(flag) for flag in ("true", "false")}
    for process in launched.values():
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 0, output[-3000:]
    rows = {flag: read_metrics(tmp_path / flag) for flag in launched}
    assert [r["step"] for r in rows["true"]] == list(range(1, 7))
    assert [r["loss"] for r in rows["true"]] == [r["loss"] for r in rows["false"]]
    assert [r["grad_norm"] for r in rows["true"]] == [r["grad_norm"] for r in rows["false"]]
    assert all(r["throughput/data_time_s"] >= 0 for r in rows["true"])


def test_the_config_switch() -> None:
    assert compose_config([])[0].data.prefetch is True
    assert compose_config(["data.prefetch=false"])[0].data.prefetch is False
