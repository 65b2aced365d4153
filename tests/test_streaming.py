"""Streaming data: documents split between validation and training as they are read, training
windows tokenized on the fly; sequential order, resume by re-tokenizing, per-rank shards."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from trainer.config import ConfigError, DataConfig
from trainer.data import PackedSplit, Sampler, shard_for_rank
from trainer.data.sampler import LaneSampler, SequentialSampler
from trainer.data.sources import FileSource, HFSource, open_source
from trainer.data.streaming import StreamingSplit, shuffled, split_texts, streaming_splits, validation_period
from trainer.data.tokenizer import ByteTokenizer

SEQ_LEN = 8


def corpus(n: int) -> list[str]:
    """`n` distinct documents of varied length, some not ASCII."""
    return [f"doc {i}: " + "ab" * (i % 5) + ("é😀" if i % 3 == 0 else "") + "\n" for i in range(n)]


def joined(texts: list[str]) -> np.ndarray:
    """All of `texts` tokenized at once by the byte tokenizer: each one's bytes, then eot 256."""
    return np.concatenate([np.array(list(t.encode("utf-8")) + [256], dtype=np.int64) for t in texts])


def windows(stream: np.ndarray, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples `indices` of `stream` cut by hand: x = stream[i*T : i*T+T], y one token later."""
    x = np.stack([stream[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN] for i in indices])
    y = np.stack([stream[i * SEQ_LEN + 1 : i * SEQ_LEN + SEQ_LEN + 1] for i in indices])
    return torch.from_numpy(x), torch.from_numpy(y)


def files_source(tmp_path: Path, texts: list[str]) -> FileSource:
    """A data.source=files source over one .txt file per text (read in file-name order)."""
    directory = tmp_path / "docs"
    directory.mkdir()
    for i, text in enumerate(texts):
        (directory / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    source = open_source(DataConfig(source="files", path=str(directory)), tmp_path / "cache")
    assert isinstance(source, FileSource)
    return source


def hf_streaming_source(tmp_path: Path, texts: list[str]) -> HFSource:
    """A data.source=hf source with data.streaming=true over a local directory of .jsonl files."""
    directory = tmp_path / "jsonl"
    directory.mkdir()
    half = len(texts) // 2
    for name, part in (("a.jsonl", texts[:half]), ("b.jsonl", texts[half:])):
        (directory / name).write_text("".join(json.dumps({"text": t, "id": 0}) + "\n" for t in part))
    cfg = DataConfig(source="hf", path=str(directory), streaming=True, cache_dir=str(tmp_path / "cache"))
    source = open_source(cfg, tmp_path / "cache")
    assert isinstance(source, HFSource) and isinstance(source.dataset(), datasets.IterableDataset)
    return source


def make_source(kind: str, tmp_path: Path, texts: list[str]) -> FileSource | HFSource:
    return files_source(tmp_path, texts) if kind == "files" else hf_streaming_source(tmp_path, texts)


class CountingSource(FileSource):
    """A files source that counts the passes over its documents and the documents read."""

    def __init__(self, source: FileSource):
        super().__init__(source.name, source.label, source.root, source.files, source.text_field)
        self.passes = self.read = 0

    def documents(self) -> Iterator[tuple[str, int]]:
        self.passes += 1
        for document in super().documents():
            self.read += 1
            yield document


def test_validation_period():
    assert [validation_period(f) for f in (0.02, 0.1, 0.3, 0.45)] == [50, 10, 3, 2]


def test_documents_split_disjoint_and_covering(tmp_path):
    texts = corpus(23)
    directory = tmp_path / "mixed"
    directory.mkdir()
    (directory / "a.txt").write_text(texts[0])
    # blank lines and empty texts are not documents: they take no number in the split
    lines = [json.dumps({"text": t}) for t in texts[1:12]] + ["", json.dumps({"text": ""})]
    (directory / "b.jsonl").write_text("\n".join(lines + [json.dumps({"text": t}) for t in texts[12:]]) + "\n")
    source = open_source(DataConfig(source="files", path=str(directory)), tmp_path / "cache")
    val = list(split_texts(source, 4, validation=True))
    train = list(split_texts(source, 4, validation=False))
    assert val == [texts[i] for i in (0, 4, 8, 12, 16, 20)]
    assert train == [t for i, t in enumerate(texts) if i % 4]
    assert not set(val) & set(train) and sorted(val + train) == sorted(texts)


@pytest.mark.parametrize("kind", ["files", "hf"])
def test_streamed_windows_equal_the_whole_tokenization(tmp_path, kind):
    texts = corpus(30)
    source = make_source(kind, tmp_path, texts)
    train, val = streaming_splits(source, ByteTokenizer(), SEQ_LEN, 0.25, val_samples=3, chunk_documents=3)
    train_stream = joined([t for i, t in enumerate(texts) if i % 4])
    val_stream = joined(texts[::4])
    np.testing.assert_array_equal(val.tokens, val_stream[: 3 * SEQ_LEN + 1])
    assert isinstance(val, PackedSplit) and len(val) == 3
    # the first epoch in requests of 5 windows, then two epochs on: the stream starts over at its end
    per_epoch = len(train_stream) // SEQ_LEN
    for start in [*range(0, per_epoch, 5), 2 * per_epoch - 2]:
        indices = np.arange(start, start + 5)
        x, y = train.get_batch(indices)
        expected_x, expected_y = windows(np.tile(train_stream, 3), indices)
        assert x.dtype == y.dtype == torch.int64 and x.shape == (5, SEQ_LEN)
        torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
        torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    assert train.epoch == 2


def test_nothing_is_tokenized_before_the_first_batch(tmp_path):
    source = CountingSource(files_source(tmp_path, corpus(200)))
    train, val = streaming_splits(source, ByteTokenizer(), 16, 0.1, val_samples=2, chunk_documents=4)
    # validation: one batch of 4 validation documents (numbers 0, 10, 20, 30) holds its 33 tokens
    assert (source.passes, source.read, len(val)) == (1, 31, 2)
    x0, _ = train.get_batch(np.arange(2))
    # training: one batch of 4 train documents (numbers 1-4; 0 is validation's) holds two windows
    assert (source.passes, source.read) == (2, 31 + 5)
    train.get_batch(np.arange(40, 44))
    assert source.passes == 2 and source.read < 200
    again, _ = train.get_batch(np.arange(2))  # before the buffer: the stream starts over
    assert source.passes == 3
    torch.testing.assert_close(again, x0, rtol=0, atol=0)


def test_resume_gives_identical_batches(tmp_path):
    source = files_source(tmp_path, corpus(12))

    def splits() -> StreamingSplit:
        train, _ = streaming_splits(
            source, ByteTokenizer(), SEQ_LEN, 0.3, 1, shuffle_buffer=4, seed=3, chunk_documents=2
        )
        return train

    original = splits()
    sampler = original.sampler(seed=0)
    assert isinstance(sampler, LaneSampler)
    for _ in range(7):
        original.get_batch(sampler.next_global_batch(6))
    state = json.loads(json.dumps(sampler.state_dict()))
    assert state == {"kind": "lanes", "batches": 7}
    expected = [original.get_batch(sampler.next_global_batch(6)) for _ in range(5)]
    assert original.epoch >= 2  # the batches after the checkpoint reach a later, reshuffled epoch

    resumed, resumed_sampler = splits(), LaneSampler()
    resumed_sampler.load_state_dict(state)
    longest = max(len(t.encode()) + 1 for t in corpus(12))
    for i, (x, y) in enumerate(expected):
        got_x, got_y = resumed.get_batch(resumed_sampler.next_global_batch(6))
        torch.testing.assert_close(got_x, x, rtol=0, atol=0)
        torch.testing.assert_close(got_y, y, rtol=0, atol=0)
        if i == 0:  # skipping forward to the resume point kept, per lane, its window and a few documents
            assert resumed.buffered_tokens < 6 * (SEQ_LEN + 1 + 3 * longest)


def test_shuffled_is_a_seeded_permutation_within_a_buffer():
    texts = [str(i) for i in range(40)]
    first = list(shuffled(texts, 8, np.random.default_rng([5, 0])))
    assert first == list(shuffled(texts, 8, np.random.default_rng([5, 0])))
    assert first != list(shuffled(texts, 8, np.random.default_rng([5, 1])))
    assert sorted(first) == sorted(texts) and first != texts
    # a text is yielded at most buffer_size places before its own position
    assert all(int(t) <= position + 8 for position, t in enumerate(first))


def test_each_epoch_reshuffles_and_skipping_forward_holds_little():
    texts = corpus(30)
    peak = 0

    def texts_watching_the_buffer() -> Iterator[str]:
        nonlocal peak
        for text in texts:
            peak = max(peak, train.buffered_tokens)
            yield text

    train = StreamingSplit(
        texts_watching_the_buffer, ByteTokenizer(), SEQ_LEN, shuffle_buffer=6, seed=9, chunk_documents=2
    )
    epochs = [joined(list(shuffled(texts, 6, np.random.default_rng([9, epoch])))) for epoch in range(3)]
    stream = np.concatenate(epochs)
    indices = np.arange(len(stream) // SEQ_LEN - 4, len(stream) // SEQ_LEN)  # the end of the third epoch
    x, y = train.get_batch(indices)
    expected_x, expected_y = windows(stream, indices)
    torch.testing.assert_close(x, expected_x, rtol=0, atol=0)
    torch.testing.assert_close(y, expected_y, rtol=0, atol=0)
    assert train.epoch == 2 and not np.array_equal(epochs[0], epochs[1])
    assert peak < 4 * SEQ_LEN + 4 * max(len(t.encode()) + 1 for t in texts)  # not the two epochs skipped


def test_rank_shards_concatenate_to_the_global_batch(tmp_path):
    source = files_source(tmp_path, corpus(20))

    def train() -> StreamingSplit:
        return streaming_splits(source, ByteTokenizer(), SEQ_LEN, 0.2, 1, chunk_documents=3)[0]

    world, whole = [train(), train()], train()  # each rank streams on its own, like the reference
    samplers = [split.sampler(seed=0) for split in world]
    reference = whole.sampler(seed=0)
    for _ in range(6):
        global_batch = reference.next_global_batch(8)
        shards = []
        for rank, (split, sampler) in enumerate(zip(world, samplers, strict=True)):
            indices = sampler.next_global_batch(8)
            np.testing.assert_array_equal(indices, global_batch)
            shards.append(split.get_batch(shard_for_rank(indices, rank, 2)))
        x, y = whole.get_batch(global_batch)
        torch.testing.assert_close(torch.cat([s[0] for s in shards]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([s[1] for s in shards]), y, rtol=0, atol=0)


def lane_stream(texts: list[str], lane: int, lanes: int, epochs: int) -> np.ndarray:
    """Lane `lane` of `lanes` cut by hand: the documents numbered lane, lane + lanes, ... over `epochs`
    passes (numbers continue from one epoch to the next), each followed by eot."""
    numbered = [t for _ in range(epochs) for t in texts]
    return joined(numbered[lane::lanes])


def test_lanes_are_the_documents_dealt_round_robin():
    texts = corpus(13)  # 13 documents, 4 lanes: the lanes' documents change from one epoch to the next
    train = StreamingSplit(lambda: texts, ByteTokenizer(), SEQ_LEN, chunk_documents=3)
    sampler = train.sampler(seed=0)
    for k in range(12):
        rows = sampler.next_global_batch(4)
        np.testing.assert_array_equal(rows, [[k, j, 4] for j in range(4)])
        x, y = train.get_batch(rows)
        for j in range(4):
            expected_x, expected_y = windows(lane_stream(texts, j, 4, 12), [k])
            torch.testing.assert_close(x[j : j + 1], expected_x, rtol=0, atol=0)
            torch.testing.assert_close(y[j : j + 1], expected_y, rtol=0, atol=0)
    assert train.epoch >= 2


class CountingTokenizer(ByteTokenizer):
    """Bytes, counting the documents encoded."""

    def __init__(self) -> None:
        self.encoded = 0

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        self.encoded += len(texts)
        return super().encode_batch(texts)


@pytest.mark.parametrize("world", [2, 4])
def test_each_rank_tokenizes_its_own_lanes_and_the_global_batch_does_not_change(world):
    """World size 1 and `world`: the same global batches; each of `world` ranks tokenizes about 1 /
    world of the documents the single process tokenizes (its rows' lanes: 8 / world of 8)."""
    texts = corpus(120)
    make = lambda tokenizer: StreamingSplit(lambda: texts, tokenizer, SEQ_LEN, chunk_documents=4)  # noqa: E731
    whole_tokenizer = CountingTokenizer()
    whole, reference = make(whole_tokenizer), LaneSampler()
    ranks = [(make(tokenizer), LaneSampler(), tokenizer) for tokenizer in (CountingTokenizer() for _ in range(world))]
    for _ in range(40):
        global_batch = reference.next_global_batch(8)
        x, y = whole.get_batch(global_batch)
        shards = [split.get_batch(shard_for_rank(sampler.next_global_batch(8), r, world))
                  for r, (split, sampler, _) in enumerate(ranks)]  # fmt: skip
        torch.testing.assert_close(torch.cat([s[0] for s in shards]), x, rtol=0, atol=0)
        torch.testing.assert_close(torch.cat([s[1] for s in shards]), y, rtol=0, atol=0)
    assert whole.epoch >= 1 and whole_tokenizer.encoded == whole.tokenized_documents
    share = 8 // world
    for r, (split, _, tokenizer) in enumerate(ranks):
        assert split.mine == set(range(r * share, (r + 1) * share))
        # its lanes' documents and no other: 1 / world of them, to a few documents (how far each lane ran ahead)
        assert tokenizer.encoded == split.tokenized_documents
        assert abs(tokenizer.encoded - whole_tokenizer.encoded / world) <= 8


def test_a_stream_resumes_at_another_world_size():
    """Two ranks stop after 9 global batches; one process loads the sampler state and draws the
    global batches the two ranks would have drawn next (the same rows, the same tokens)."""
    texts = corpus(40)
    make = lambda: StreamingSplit(lambda: texts, ByteTokenizer(), SEQ_LEN, shuffle_buffer=5, seed=4)  # noqa: E731
    ranks = [(make(), LaneSampler()) for _ in range(2)]
    for _ in range(9):
        for r, (split, sampler) in enumerate(ranks):
            split.get_batch(shard_for_rank(sampler.next_global_batch(6), r, 2))
    state = json.loads(json.dumps(ranks[0][1].state_dict()))
    one, one_sampler = make(), LaneSampler()
    one_sampler.load_state_dict(state)
    for _ in range(6):
        x, y = one.get_batch(one_sampler.next_global_batch(6))
        shards = [split.get_batch(shard_for_rank(sampler.next_global_batch(6), r, 2))
                  for r, (split, sampler) in enumerate(ranks)]  # fmt: skip
        torch.testing.assert_close(x, torch.cat([s[0] for s in shards]), rtol=0, atol=0)
        torch.testing.assert_close(y, torch.cat([s[1] for s in shards]), rtol=0, atol=0)


def test_splits_name_their_sampler():
    packed = PackedSplit(np.arange(50), 4)
    np.testing.assert_array_equal(packed.sampler(7).next_global_batch(30), Sampler(12, 7).next_global_batch(30))
    sequential = SequentialSampler()
    np.testing.assert_array_equal(sequential.next_global_batch(3), [0, 1, 2])
    np.testing.assert_array_equal(sequential.next_global_batch(2), [3, 4])
    with pytest.raises(ValueError, match="data.streaming changed"):
        SequentialSampler().load_state_dict(Sampler(10, 0).state_dict())
    with pytest.raises(ValueError, match="data.streaming changed"):
        Sampler(10, 0).load_state_dict(sequential.state_dict())
    with pytest.raises(ValueError, match="data.streaming changed"):
        LaneSampler().load_state_dict(Sampler(10, 0).state_dict())
    with pytest.raises(ValueError, match="data.streaming changed"):
        Sampler(10, 0).load_state_dict(LaneSampler().state_dict())
    with pytest.raises(ValueError, match="before streams were dealt into lanes"):
        LaneSampler().load_state_dict(sequential.state_dict())


def test_splits_too_small_name_the_setting(tmp_path):
    source = files_source(tmp_path, ["val doc\n", "short\n", "a third, longer validation document\n"])
    with pytest.raises(ConfigError, match=r"validation split .* raise data.val_fraction"):
        streaming_splits(source, ByteTokenizer(), 64, 0.45, 1)
    train, _ = streaming_splits(source, ByteTokenizer(), 12, 0.45, 1)
    with pytest.raises(
        ConfigError, match=r"train split of data.path=.* holds 7 tokens, fewer than train.seq_len\+1=13"
    ):
        train.get_batch(np.arange(1))
    with pytest.raises(IndexError):
        train.get_batch(np.array([-1]))
