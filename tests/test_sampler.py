"""The resumable sampler and the per-rank slicing of a global batch."""

from __future__ import annotations

import json

import numpy as np
import pytest

from trainer.data import Sampler, shard_for_rank


def draw(sampler: Sampler, batches: int, batch_size: int) -> np.ndarray:
    return np.stack([sampler.next_global_batch(batch_size) for _ in range(batches)])


def test_same_seed_same_sequence():
    a, b = Sampler(100, seed=7), Sampler(100, seed=7)
    np.testing.assert_array_equal(draw(a, 20, 16), draw(b, 20, 16))
    assert not np.array_equal(draw(Sampler(100, seed=7), 5, 16), draw(Sampler(100, seed=8), 5, 16))


def test_epoch_order_is_the_seeded_permutation():
    sampler = Sampler(50, seed=3)
    first_two_epochs = np.concatenate([sampler.next_global_batch(10) for _ in range(10)])
    for epoch in (0, 1):
        expected = np.random.default_rng([3, epoch]).permutation(50)
        np.testing.assert_array_equal(first_two_epochs[epoch * 50 : (epoch + 1) * 50], expected)


def test_resume_continues_identically():
    original = Sampler(50, seed=11)
    draw(original, 7, 13)  # part way into the second epoch
    state = json.loads(json.dumps(original.state_dict()))  # survives a JSON round trip
    assert state == {"seed": 11, "epoch": 1, "position": 41, "num_samples": 50}
    resumed = Sampler(50, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(draw(resumed, 10, 13), draw(original, 10, 13))


def test_every_index_once_per_epoch():
    num_samples, batch = 37, 5  # batches straddle epoch boundaries
    sampler = Sampler(num_samples, seed=1)
    stream = np.concatenate([sampler.next_global_batch(batch) for _ in range(num_samples * 3 // batch + 1)])
    epochs = stream[: 3 * num_samples].reshape(3, num_samples)
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(num_samples))
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    assert sampler.epoch == 3


def test_batch_larger_than_an_epoch():
    sampler = Sampler(4, seed=0)
    batch = sampler.next_global_batch(10)
    assert len(batch) == 10 and sampler.state_dict()["epoch"] == 2 and sampler.position == 2
    np.testing.assert_array_equal(np.sort(batch[:4]), np.arange(4))
    np.testing.assert_array_equal(np.sort(batch[4:8]), np.arange(4))


def test_state_from_other_data_is_refused():
    state = Sampler(50, seed=1).state_dict()
    with pytest.raises(ValueError, match="50 samples but the data now has 60"):
        Sampler(60, seed=1).load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_are_disjoint_and_cover_the_batch(world_size):
    batch = Sampler(1000, seed=5).next_global_batch(24)
    shards = [shard_for_rank(batch, rank, world_size) for rank in range(world_size)]
    assert all(len(s) == 24 // world_size for s in shards)
    np.testing.assert_array_equal(np.concatenate(shards), batch)  # rank order rebuilds the batch
    assert len(set(np.concatenate(shards).tolist())) == 24


def test_uneven_shards_are_refused():
    with pytest.raises(ValueError, match="does not split evenly over 5 ranks"):
        shard_for_rank(np.arange(24), 0, 5)
    with pytest.raises(ValueError, match="outside a world of 2"):
        shard_for_rank(np.arange(24), 2, 2)
