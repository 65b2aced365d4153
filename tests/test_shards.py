"""data=shards: a prepared directory read through memmaps (train: the stream but its last
val_fraction, validation: that tail, in order), its tokenizer, and the refusals before any work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import run_cli
from test_prepare import byte_stream, prepared, write_corpus

from trainer.__main__ import preflight
from trainer.config import ConfigError, DataConfig
from trainer.data import MixtureSplit, build_data
from trainer.data.cache import split_point
from trainer.data.prepare import load_tokenizer, open_prepare_source
from trainer.data.shards import open_shards
from trainer.data.tokenizer import ByteTokenizer, to_hf

SEQ_LEN = 16


@pytest.fixture(scope="module")
def byte_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """A prepared directory of 300 documents in shards of 1,000 byte tokens, and its token stream."""
    root = tmp_path_factory.mktemp("shards")
    texts = write_corpus(root / "corpus.jsonl", 300)
    prepared(root / "corpus.jsonl", root / "bytes", shard_tokens=1000)
    return root / "bytes", byte_stream(texts)


def shards_cfg(path: Path | str, **overrides) -> DataConfig:
    return DataConfig(source="shards", path=str(path), **overrides)


def test_a_shard_set_reads_only_the_windows_asked_for(byte_shards) -> None:
    directory, stream = byte_shards
    shards = open_shards(str(directory), "data.path")
    starts = np.array([0, 990, 2995, 5000])  # the second and third run across a shard boundary
    np.testing.assert_array_equal(shards.read(starts, 17), np.stack([stream[s : s + 17] for s in starts]))
    assert sorted(shards._maps) == [0, 1, 2, 3, 5]  # shard 4 was never opened
    with pytest.raises(IndexError):
        shards.read(np.array([len(stream) - 5]), 17)


def test_data_shards_trains_on_the_stream_and_validates_on_its_tail(byte_shards) -> None:
    directory, stream = byte_shards
    data = build_data(shards_cfg(directory, val_fraction=0.1), SEQ_LEN, seed=0)
    assert isinstance(data.train, MixtureSplit) and isinstance(data.tokenizer, ByteTokenizer)
    split = split_point(len(stream), 0.1)
    train, val = stream[:split], stream[split:]
    assert len(data.train) == (len(train) - 1) // SEQ_LEN and len(data.val) == (len(val) - 1) // SEQ_LEN
    assert data.train.num_tokens + data.val.num_tokens == len(stream)

    def windows(tokens: np.ndarray, indices: np.ndarray) -> np.ndarray:
        return np.stack([tokens[i * SEQ_LEN : i * SEQ_LEN + SEQ_LEN + 1] for i in indices])

    indices = np.array([0, 5, len(data.train) - 1, 61])
    x, y = data.train.get_batch(indices)
    expected = torch.from_numpy(windows(train, indices))
    torch.testing.assert_close(x, expected[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(y, expected[:, 1:], rtol=0, atol=0)
    x, y = data.val.get_batch(np.arange(len(data.val)))  # in the stream's order
    expected = torch.from_numpy(windows(val, np.arange(len(data.val))))
    torch.testing.assert_close(x, expected[:, :-1], rtol=0, atol=0)
    torch.testing.assert_close(y, expected[:, 1:], rtol=0, atol=0)
    meta = json.loads((directory / "meta.json").read_text())
    assert data.unigram_entropy == pytest.approx(meta["unigram_entropy"], rel=1e-12)
    assert data.documents == meta["documents"]
    assert f"shards {directory}" in data.describe() and f"{len(stream):,} tokens" in data.describe()
    sampler = data.train.sampler(0)  # one source: every window once per epoch
    drawn = np.concatenate([sampler.next_global_batch(8) for _ in range(len(data.train) // 8)])
    assert len(set(drawn.tolist())) == len(drawn)
    assert sampler.tokens_drawn() == {directory.name: len(drawn) * SEQ_LEN}


@pytest.fixture(scope="module")
def bpe_shards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Shards made with a 300-token BPE, and a Hugging Face tokenizer directory that is not it."""
    root = tmp_path_factory.mktemp("bpe")
    write_corpus(root / "corpus.jsonl", 200)
    source = open_prepare_source(str(root / "corpus.jsonl"), "text", None)
    bpe = load_tokenizer("bpe", source, 300, str(root / "cache"))
    prepared(root / "corpus.jsonl", root / "bpe", 2000, bpe)
    to_hf(ByteTokenizer()).save_pretrained(str(root / "other"))
    return root / "bpe", root / "other"


def test_a_run_uses_the_shards_own_tokenizer_and_refuses_another(bpe_shards) -> None:
    directory, other = bpe_shards
    meta = json.loads((directory / "meta.json").read_text())
    for setting in (None, "bpe"):  # null, and bpe (the BPE the shards were made with)
        data = build_data(shards_cfg(directory, tokenizer=setting), SEQ_LEN, seed=0)
        assert data.tokenizer.fingerprint() == meta["tokenizer"]["fingerprint"] and data.vocab_size == 300
    fingerprint = meta["tokenizer"]["fingerprint"]
    for setting, theirs in (("byte", "byte (byte)"), (str(other), "hf (hf-")):
        with pytest.raises(ConfigError) as info:
            build_data(shards_cfg(directory, tokenizer=setting), SEQ_LEN, seed=0)
        message = str(info.value)
        assert message.startswith(
            f"data.path: its shards were made with the bpe tokenizer ({fingerprint}), this run's is {theirs}"
        )
        assert f"from data.tokenizer={setting}: prepare the shards again" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"from model.pretrained=.*: prepare the shards again"):
        build_data(shards_cfg(directory), SEQ_LEN, seed=0, pretrained=str(other))


def test_shards_prepared_with_a_tokenizer_directory_carry_it(tmp_path: Path, bpe_shards) -> None:
    _, other = bpe_shards  # a Hugging Face tokenizer (bytes, with <|endoftext|>)
    texts = write_corpus(tmp_path / "corpus.jsonl", 40)
    source = open_prepare_source(str(tmp_path / "corpus.jsonl"), "text", None)
    tokenizer = load_tokenizer(str(other), source, 0, "")
    prepared(tmp_path / "corpus.jsonl", tmp_path / "hf", 500, tokenizer)
    assert (tmp_path / "hf" / "tokenizer" / "tokenizer.json").is_file()
    for setting in (None, str(other)):
        data = build_data(shards_cfg(tmp_path / "hf", tokenizer=setting), SEQ_LEN, seed=0)
        assert data.tokenizer.fingerprint() == tokenizer.fingerprint()
    x, _ = data.train.get_batch(np.array([0]))
    assert x[0].tolist() == byte_stream(texts)[:SEQ_LEN].tolist()  # its ids are the bytes


def test_bad_shard_directories_are_refused_in_one_line(tmp_path: Path, byte_shards) -> None:
    directory, _ = byte_shards
    unfinished = tmp_path / "unfinished"
    write_corpus(tmp_path / "corpus.jsonl", 50)
    prepared(tmp_path / "corpus.jsonl", unfinished, 500)
    (unfinished / "meta.json").unlink()
    damaged = tmp_path / "damaged"
    prepared(tmp_path / "corpus.jsonl", damaged, 500)
    with open(damaged / "shard-00001.bin", "ab") as f:
        f.write(b"\0\0")
    cases = [
        (shards_cfg(tmp_path / "missing"), f"data.path: {tmp_path / 'missing'} is not a directory: make it with "
                                           f"python -m trainer.data.prepare SOURCE --out {tmp_path / 'missing'}"),
        (shards_cfg(unfinished), f"data.path: {unfinished} holds no readable meta.json, so its prepare did not finish"),
        (shards_cfg(damaged), f"data.path: {damaged / 'shard-00001.bin'} is 1,002 bytes, meta.json says 1,000 bytes"),
        (DataConfig(source="shards"), "data=shards needs data.path=DIR"),
        (shards_cfg(directory, val_fraction=0.001), "the validation part of"),
    ]  # fmt: skip
    for cfg, expected in cases:
        with pytest.raises(ConfigError) as info:
            build_data(cfg, 64, seed=0)
        assert expected in str(info.value) and "\n" not in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["data.mixture=[{name:a,path:/x,weight:0}]"], "data.mixture source 'a': weight=0 must be a number > 0"),
        (["data.mixture=[{name:a,path:/x,weight:-0.5}]"], "data.mixture source 'a': weight=-0.5 must be a number > 0"),
        (["data.mixture=[{name:a,path:/x}]"], "each source is {name: NAME, path: DIR, weight: W}"),
        (["data.mixture=[{name:a,path:/x,weight:1},{name:a,path:/y,weight:1}]"], "data.mixture names 'a' twice"),
        (["data.path=/x", "data.mixture=[{name:a,path:/x,weight:1}]"], "data.path or data.mixture, not both"),
        (["data.streaming=true", "data.path=/x"], "data=shards reads finished shards: drop data.streaming"),
    ],
)
def test_mixture_settings_are_refused_in_preflight(overrides: list[str], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        preflight(["data=shards", *overrides])
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_the_cli_refuses_a_missing_shard_directory_in_one_line(tmp_path: Path) -> None:
    result = run_cli(
        "data=shards", f"data.path={tmp_path / 'nowhere'}", "logger.wandb=false", f"hydra.run.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"error: data.path: {tmp_path / 'nowhere'} is not a directory: make it with python -m trainer.data.prepare "
        f"SOURCE --out {tmp_path / 'nowhere'} --tokenizer ..."
    ]
