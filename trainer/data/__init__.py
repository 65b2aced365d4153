"""Data: source -> tokenizer -> token cache (memmap) -> packed sequences -> resumable sampler.

Use: `data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed)`, one
`sampler = Sampler(len(data.train), cfg.train.seed)` per rank, and each step
`x, y = data.train.get_batch(shard_for_rank(sampler.next_global_batch(B), rank, world_size))`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError, DataConfig
from trainer.data.cache import cached_bpe, open_or_build, split_point, token_dtype, unigram_entropy
from trainer.data.packing import PackedSplit
from trainer.data.sampler import Sampler, shard_for_rank
from trainer.data.sources import open_source
from trainer.data.synthetic import synthetic_stream
from trainer.data.tokenizer import (
    ByteTokenizer,
    IdentityTokenizer,
    Tokenizer,
    check_tokenizer_setting,
    load_hf_tokenizer,
)

__all__ = ["Data", "PackedSplit", "Sampler", "Tokenizer", "build_data", "shard_for_rank"]


@dataclass
class Data:
    """Everything the loop needs from the data: a tokenizer and the two packed splits."""

    tokenizer: Tokenizer
    train: PackedSplit
    val: PackedSplit
    unigram_entropy: float  # nats/token of the train split's frequencies: a unigram model's loss
    entropy_rate: float | None  # synthetic only: the loss floor, nats/token
    source: str  # e.g. "stdlib (/usr/lib/python3.11, 734 files)"
    documents: int | None
    cache: str  # "cache hit <dir>", "cache built in 1.2s: <dir>" or "not cached (generated)"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def describe(self) -> str:
        """One line: source, documents, tokens, vocabulary, cache."""
        documents = f"{self.documents:,} documents, " if self.documents is not None else ""
        tokens = self.train.num_tokens + self.val.num_tokens
        floor = f", entropy rate {self.entropy_rate:.4f} nats" if self.entropy_rate is not None else ""
        return (
            f"data: {self.source}: {documents}{tokens:,} tokens ({self.train.num_tokens:,} train / "
            f"{self.val.num_tokens:,} val), vocab {self.vocab_size} "
            f"({getattr(self.tokenizer, 'name', 'custom')}), unigram entropy "
            f"{self.unigram_entropy:.3f} nats{floor}; {self.cache}"
        )


def build_data(cfg: DataConfig, seq_len: int, seed: int, *, rank: int = 0) -> Data:
    """Build (or open from the cache) the packed train and validation splits that `cfg` names.

    Settings that cannot work raise ConfigError before any tokenizing. Only rank 0 shows progress.
    (Every rank builds for now; the atomic renames keep concurrent builds of one entry safe.)
    """
    show_progress = rank == 0
    if cfg.source == "synthetic":
        return _synthetic_data(cfg, seq_len, seed)
    check_tokenizer_setting(cfg.tokenizer)
    cache_root = Path(cfg.cache_dir).expanduser()
    source = open_source(cfg, cache_root)
    if cfg.tokenizer == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif cfg.tokenizer == "bpe":
        tokenizer = cached_bpe(source, cfg.bpe_vocab_size, cache_root, show_progress=show_progress)
    else:
        tokenizer = load_hf_tokenizer(cfg.tokenizer)
    cache = open_or_build(source, tokenizer, cache_root, cfg.val_fraction, show_progress=show_progress)
    split = split_point(len(cache.tokens), cfg.val_fraction)
    _check_split_sizes(split, len(cache.tokens) - split, seq_len)
    if cache.meta["split"] == split:
        entropy = cache.meta["train_unigram_entropy"]
    else:  # data.val_fraction changed since the cache was built
        entropy = unigram_entropy(cache.tokens[:split], tokenizer.vocab_size)
    status = "cache hit" if cache.hit else f"cache built in {cache.meta['build_seconds']:.1f}s:"
    return Data(
        tokenizer=tokenizer,
        train=PackedSplit(cache.tokens[:split], seq_len),
        val=PackedSplit(cache.tokens[split:], seq_len),
        unigram_entropy=entropy,
        entropy_rate=None,
        source=source.describe(),
        documents=cache.meta["documents"],
        cache=f"{status} {cache.directory}",
    )


def _synthetic_data(cfg: DataConfig, seq_len: int, seed: int) -> Data:
    # config.check_run has checked that both splits hold a sample (DataConfig: sizes are positive).
    split = split_point(cfg.synthetic_tokens, cfg.val_fraction)
    tokens, rate = synthetic_stream(cfg.synthetic_vocab, cfg.synthetic_tokens, cfg.synthetic_concentration, seed)
    tokens = tokens.astype(token_dtype(cfg.synthetic_vocab))
    return Data(
        tokenizer=IdentityTokenizer(cfg.synthetic_vocab),
        train=PackedSplit(tokens[:split], seq_len),
        val=PackedSplit(tokens[split:], seq_len),
        unigram_entropy=unigram_entropy(tokens[:split], cfg.synthetic_vocab),
        entropy_rate=rate,
        source=f"synthetic Markov chain (concentration {cfg.synthetic_concentration}, seed {seed})",
        documents=None,
        cache="not cached (generated)",
    )


def _check_split_sizes(train_tokens: int, val_tokens: int, seq_len: int) -> None:
    """Each split must hold at least one sample: seq_len + 1 tokens."""
    need = seq_len + 1
    more_data = "use a larger corpus"
    if train_tokens < need:
        raise ConfigError(
            f"train split holds {train_tokens} tokens, fewer than train.seq_len+1={need}: "
            f"lower train.seq_len or {more_data}"
        )
    if val_tokens < need:
        raise ConfigError(
            f"validation split holds {val_tokens} tokens, fewer than train.seq_len+1="
            f"{need}: lower train.seq_len or raise data.val_fraction"
        )
