"""Data: source -> tokenizer -> token cache (memmap) -> packed sequences -> resumable sampler.

Use: `data = build_data(cfg.data, cfg.train.seq_len, cfg.train.seed, pretrained=cfg.model.pretrained)`,
one `sampler = Sampler(len(data.train), cfg.train.seed)` per rank, and each step
`x, y, *positions = data.train.get_batch(shard_for_rank(sampler.next_global_batch(B), rank, world_size))`.

data.format=text gives PackedSplit windows of one token stream, (x, y); data=shards gives MixtureSplit
windows of pretokenized shard directories (trainer/data/prepare.py writes them), one or several sampled
by weight (data.mixture), whose sampler also counts the tokens drawn from each. data.format=instruct / chat
gives ExampleSplit rows of whole examples whose non-target tokens have IGNORE_INDEX targets, (x, y,
positions) with data.document_mask. data.format=preference gives PreferenceSplit pairs, two rows each
(chosen, rejected); data.format=prompts gives PromptSplit prompts, a batch being their indices. Each
split's `fields` names what get_batch returns. `data.tokenizer` is the model's own tokenizer (a
PretrainedTokenizer, which has `save(directory)`) when model.pretrained is set and data.tokenizer is null.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from trainer.config import ConfigError, DataConfig
from trainer.data.cache import Source, cached_bpe, open_or_build, split_point, token_dtype, unigram_entropy
from trainer.data.examples import ExampleSplit, open_or_build_examples, padding_id
from trainer.data.mixture import MixtureSplit, mixture_entropy, mixture_splits
from trainer.data.packing import PackedSplit
from trainer.data.preference import PreferenceSplit, check_preference_config, open_or_build_pairs
from trainer.data.prompts import PromptRecord, PromptSplit, read_prompts
from trainer.data.sampler import Sampler, shard_for_rank
from trainer.data.shards import mixture_sources, open_sources, run_tokenizer
from trainer.data.sources import open_source
from trainer.data.streaming import StreamingSplit, streaming_splits, validation_period
from trainer.data.synthetic import synthetic_stream
from trainer.data.tokenizer import (
    ByteTokenizer,
    IdentityTokenizer,
    PretrainedTokenizer,
    Tokenizer,
    choose_tokenizer,
    load_pretrained_tokenizer,
)

__all__ = [
    "Data",
    "ExampleSplit",
    "MixtureSplit",
    "PackedSplit",
    "PreferenceSplit",
    "PretrainedTokenizer",
    "PromptRecord",
    "PromptSplit",
    "Sampler",
    "Tokenizer",
    "build_data",
    "shard_for_rank",
]

Split = PackedSplit | ExampleSplit | StreamingSplit | PreferenceSplit | PromptSplit | MixtureSplit


def target_tokens(split: Split) -> int:
    """Tokens of a split that count toward the loss in one pass over its rows (prompts: none, the
    completions are sampled)."""
    windows = isinstance(split, PackedSplit | StreamingSplit | MixtureSplit)
    return len(split) * split.seq_len if windows else split.target_tokens


@dataclass
class Data:
    """Everything the loop needs from the data: a tokenizer, the two splits, and what to report."""

    tokenizer: Tokenizer
    train: Split
    val: Split
    unigram_entropy: float  # nats/token of the train split's (instruct / chat / preference: all targets') frequencies
    entropy_rate: float | None  # synthetic only: the loss floor, nats/token
    source: str  # e.g. "stdlib (/usr/lib/python3.11, 734 files)"
    documents: int | None
    cache: str  # "cache hit <dir>", "cache built in 1.2s: <dir>" or "not cached (generated)"
    format: str = "text"  # text | instruct | chat | preference | prompts
    examples: int | None = None  # instruct / chat: examples in both splits; preference: pairs; prompts: prompts
    skipped: int = 0  # instruct / chat / preference / prompts: bad records skipped (data.on_bad_record=skip)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def truncated(self) -> int:
        """Examples longer than train.seq_len, cut to it (instruct / chat; preference: pairs)."""
        return sum(getattr(split, "truncated", 0) for split in (self.train, self.val))

    @property
    def target_tokens(self) -> tuple[int, int]:
        """(train, val) tokens that count toward the loss in one pass over each split."""
        return target_tokens(self.train), target_tokens(self.val)

    def describe(self) -> str:
        """One line: source, documents or examples, tokens, targets, vocabulary, cache."""
        name = getattr(self.tokenizer, "name", "custom")
        vocab = f"vocab {self.vocab_size} ({name})"
        if isinstance(self.train, StreamingSplit):
            return (
                f"data: {self.source}: streamed, {self.val.num_tokens:,} validation tokens, {vocab}, unigram "
                f"entropy {self.unigram_entropy:.3f} nats (validation); {self.cache}"
            )
        if self.format == "text":
            documents = f"{self.documents:,} documents, " if self.documents is not None else ""
            tokens = self.train.num_tokens + self.val.num_tokens
            floor = f", entropy rate {self.entropy_rate:.4f} nats" if self.entropy_rate is not None else ""
            return (
                f"data: {self.source}: {documents}{tokens:,} tokens ({self.train.num_tokens:,} train / "
                f"{self.val.num_tokens:,} val), {vocab}, unigram entropy {self.unigram_entropy:.3f} nats{floor}; "
                f"{self.cache}"
            )
        train, val = self.train, self.val
        skipped = f", {self.skipped:,} bad records skipped" if self.skipped else ""
        if self.format == "prompts":
            return (
                f"data: {self.source}: prompts, {self.examples:,} prompts ({len(train):,} train / {len(val):,} val)"
                f"{skipped}, {train.num_tokens + val.num_tokens:,} tokens (longest "
                f"{max(train.max_prompt_tokens, val.max_prompt_tokens):,}), {vocab}; {self.cache}"
            )
        if self.format == "preference":
            identical = f", {train.identical:,} with identical rows left out" if train.identical else ""
            truncated = f", {self.truncated:,} truncated to seq_len {train.seq_len}" if self.truncated else ""
            rows = f"{2 * self.examples:,} rows padded"
            if train.packing:
                rows = f"packed whole into {len(train) + len(val):,} rows (each sequence at most seq_len // 2)"
            return (
                f"data: {self.source}: preference, {self.examples:,} pairs ({train.pairs:,} train / {val.pairs:,} val)"
                f"{skipped}{identical}{truncated}, {train.num_tokens + val.num_tokens:,} tokens, "
                f"{sum(self.target_tokens):,} target tokens ({self.target_tokens[0]:,} train / "
                f"{self.target_tokens[1]:,} val), {rows} ({self.padding:.1%} padding), "
                f"{vocab}; {self.cache}"
            )
        empty = train.without_targets + val.without_targets
        truncated = (
            f", {self.truncated:,} truncated to seq_len {train.seq_len}"
            + (f" ({empty:,} left with no target)" if empty else "")
            if self.truncated or empty
            else ""
        )
        return (
            f"data: {self.source}: {self.format}, {self.examples:,} examples ({train.num_examples:,} train / "
            f"{val.num_examples:,} val){skipped}{truncated}, {train.num_tokens + val.num_tokens:,} tokens, "
            f"{sum(self.target_tokens):,} target tokens ({self.target_tokens[0]:,} train / "
            f"{self.target_tokens[1]:,} val), {len(train) + len(val):,} rows {'packed' if train.packing else 'padded'}"
            f" ({self.padding:.1%} padding), {vocab}; {self.cache}"
        )

    @property
    def padding(self) -> float:
        """Share of the rows' positions that are padding (0 for text: windows are all tokens)."""
        if self.format == "text":
            return 0.0
        rows = len(self.train) + len(self.val)
        return (self.train.padding * len(self.train) + self.val.padding * len(self.val)) / rows


def build_data(
    cfg: DataConfig,
    seq_len: int,
    seed: int,
    *,
    rank: int = 0,
    pretrained: str | None = None,
    val_samples: int = 64,
    completion_room: int = 0,
) -> Data:
    """Build (or open from the caches) the train and validation splits that `cfg` names.

    pretrained: model.pretrained, whose own tokenizer is used when data.tokenizer is null. Settings
    that cannot work raise ConfigError before any tokenizing. Only rank 0 shows progress.
    data.streaming (text): nothing is tokenized ahead but the first `val_samples` validation windows.
    completion_room (prompts): tokens each prompt must leave free within seq_len (objective.max_new_tokens).
    """
    show_progress = rank == 0
    if cfg.source == "synthetic":
        return _synthetic_data(cfg, seq_len, seed)
    if cfg.source == "shards":
        return _shards_data(cfg, seq_len, seed, pretrained)
    if cfg.format == "preference":
        check_preference_config(cfg)
    choice = choose_tokenizer(cfg, pretrained)
    if choice == "bpe" and cfg.format in ("preference", "prompts"):  # auto: a BPE would be trained on records
        raise ConfigError(
            f"data.format={cfg.format} needs the model's tokenizer: set model.pretrained=DIR or data.tokenizer=DIR "
            "(or data.tokenizer=byte for a byte-level model)"
        )
    cache_root = Path(cfg.cache_dir).expanduser()
    source = open_source(cfg, cache_root)
    if choice == "byte":
        tokenizer: Tokenizer = ByteTokenizer()
    elif choice == "bpe":
        tokenizer = cached_bpe(source, cfg.bpe_vocab_size, cache_root, show_progress=show_progress)
    else:
        key = "data.tokenizer" if cfg.tokenizer else "model.pretrained"
        tokenizer = load_pretrained_tokenizer(choice, key)
    if cfg.format == "preference":
        return _preference_data(cfg, source, tokenizer, seq_len, cache_root, show_progress)
    if cfg.format == "prompts":
        return _prompt_data(cfg, source, tokenizer, seq_len, completion_room, show_progress)
    if cfg.format != "text":
        return _example_data(cfg, source, tokenizer, seq_len, cache_root, show_progress)
    if cfg.streaming:
        return _streaming_data(source, tokenizer, seq_len, cfg.val_fraction, val_samples, seed)
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


def _example_data(
    cfg: DataConfig, source: Source, tokenizer: Tokenizer, seq_len: int, cache_root: Path, show_progress: bool
) -> Data:
    """Instruct / chat: the example cache, split by examples (validation: the last val_fraction)."""
    cache = open_or_build_examples(source, tokenizer, cfg, cache_root, show_progress=show_progress)
    examples = cache.meta["examples"]
    held_out = _held_out(examples, cfg.val_fraction, "examples")
    layout = dict(packing=cfg.packing, document_mask=cfg.document_mask, pad_id=padding_id(tokenizer))
    train = ExampleSplit(cache, 0, examples - held_out, seq_len, **layout)
    val = ExampleSplit(cache, examples - held_out, examples, seq_len, **layout)
    status = "cache hit" if cache.hit else f"cache built in {cache.meta['build_seconds']:.1f}s:"
    return Data(
        tokenizer=tokenizer,
        train=train,
        val=val,
        unigram_entropy=cache.meta["target_unigram_entropy"],
        entropy_rate=None,
        source=source.describe(),
        documents=None,
        cache=f"{status} {cache.directory}",
        format=cfg.format,
        examples=examples,
        skipped=cache.meta["skipped"],
    )


def _preference_data(
    cfg: DataConfig, source: Source, tokenizer: Tokenizer, seq_len: int, cache_root: Path, show_progress: bool
) -> Data:
    """Preference pairs: the example cache, two examples a pair, split by pairs (validation: the last
    val_fraction)."""
    cache = open_or_build_pairs(source, tokenizer, cfg, seq_len, cache_root, show_progress=show_progress)
    pairs = cache.meta["examples"] // 2
    held_out = _held_out(pairs, cfg.val_fraction, "pairs")
    pad_id = padding_id(tokenizer)
    status = "cache hit" if cache.hit else f"cache built in {cache.meta['build_seconds']:.1f}s:"
    return Data(
        tokenizer=tokenizer,
        train=PreferenceSplit(cache, 0, pairs - held_out, seq_len, pad_id=pad_id, packing=cfg.packing),
        val=PreferenceSplit(cache, pairs - held_out, pairs, seq_len, pad_id=pad_id, packing=cfg.packing),
        unigram_entropy=cache.meta["target_unigram_entropy"],
        entropy_rate=None,
        source=source.describe(),
        documents=None,
        cache=f"{status} {cache.directory}",
        format="preference",
        examples=pairs,
        skipped=cache.meta["skipped"],
    )


def _prompt_data(
    cfg: DataConfig, source: Source, tokenizer: Tokenizer, seq_len: int, completion_room: int, show_progress: bool
) -> Data:
    """Prompts, rendered at each start and kept in memory (validation: the last val_fraction)."""
    start = time.perf_counter()
    prompts, tally = read_prompts(source, tokenizer, cfg, seq_len, completion_room, show_progress=show_progress)
    held_out = _held_out(len(prompts), cfg.val_fraction, "prompts")
    return Data(
        tokenizer=tokenizer,
        train=PromptSplit(prompts[: len(prompts) - held_out], seq_len),
        val=PromptSplit(prompts[len(prompts) - held_out :], seq_len),
        unigram_entropy=float("nan"),  # no targets: the completions are sampled
        entropy_rate=None,
        source=source.describe(),
        documents=None,
        cache=f"not cached (rendered in {time.perf_counter() - start:.1f}s)",
        format="prompts",
        examples=len(prompts),
        skipped=tally["skipped"],
    )


def _held_out(count: int, val_fraction: float, what: str) -> int:
    """How many of `count` examples / pairs / prompts the validation split holds: at least one."""
    held_out = int(count * val_fraction)
    if held_out == 0:
        fix = (
            f"raise data.val_fraction to {1 / count:.3g} or more, or add records" if 1 / count < 0.5 else "add records"
        )
        raise ConfigError(f"the validation split holds none of the {count} {what}: {fix}")
    return held_out


def _streaming_data(
    source: Source, tokenizer: Tokenizer, seq_len: int, val_fraction: float, val_samples: int, seed: int
) -> Data:
    """Text tokenized as training reads it (trainer/data/streaming.py): no cache, no pass ahead."""
    train, val = streaming_splits(source, tokenizer, seq_len, val_fraction, val_samples, seed=seed)
    return Data(
        tokenizer=tokenizer,
        train=train,
        val=val,
        unigram_entropy=unigram_entropy(val.tokens, tokenizer.vocab_size),  # of the validation windows
        entropy_rate=None,
        source=source.describe(),
        documents=None,
        cache=f"streamed: tokenized as training reads it, validation = every "
        f"{validation_period(val_fraction)}th document",
    )


def _shards_data(cfg: DataConfig, seq_len: int, seed: int, pretrained: str | None) -> Data:
    """data=shards: the prepared directories (checked first, one line each), read through memmaps; nothing
    is tokenized, and no rank reads a whole shard (trainer/data/mixture.py)."""
    sources = mixture_sources(cfg)
    sets = open_sources(cfg)
    tokenizer = run_tokenizer(cfg, sets[0], pretrained)
    names, weights = [name for name, _, _ in sources], [weight for _, _, weight in sources]
    train, val = mixture_splits(sets, names, weights, seq_len, cfg.val_fraction, seed)
    if len(sets) == 1:
        described = f"shards {sets[0].describe()}"
    else:
        total = sum(weights)
        parts = [f"{n} {w / total:.0%} {s.describe()}" for n, w, s in zip(names, weights, sets, strict=True)]
        described = f"mixture of {len(sets)} shard sets: " + ", ".join(parts)
    return Data(
        tokenizer=tokenizer,
        train=train,
        val=val,
        unigram_entropy=mixture_entropy(sets, weights),  # of the whole streams, mixed by weight
        entropy_rate=None,
        source=described,
        documents=sum(s.meta["documents"] for s in sets),
        cache="pretokenized (shard sizes checked; prepare verifies their sha256)",
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
