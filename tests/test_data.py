"""Data pipeline: sources, tokenizers, token cache, packing, synthetic chain, config errors."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer.config import ConfigError, DataConfig
from trainer.data import build_data
from trainer.data import cache as cache_module
from trainer.data import sources as sources_module
from trainer.data.cache import token_dtype, unigram_entropy
from trainer.data.sources import STDLIB_SKIP_DIRS, stdlib_files, stdlib_root
from trainer.data.synthetic import entropy_rate, markov_chain, sample_chain, stationary_distribution
from trainer.data.tokenizer import ByteTokenizer, load_pretrained_tokenizer, train_bpe

UNICODE = "naïve café — 日本語, emoji 😀🚀 and a zero-width joiner 👩‍💻\n"
DOCS = [
    "def add(x, y):\n    return x + y\n",
    UNICODE,
    "# A heading\n\nSome *markdown* text with numbers 12345.\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
]


def byte_stream(texts: list[str]) -> np.ndarray:
    """The byte tokenizer's stream for `texts`: each document's UTF-8 bytes, then 256."""
    ids: list[int] = []
    for text in texts:
        ids += list(text.encode("utf-8")) + [256]
    return np.asarray(ids, dtype=np.int64)


def write_docs(directory: Path, texts: list[str], suffix: str = ".txt") -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, text in enumerate(texts):
        paths.append(directory / f"doc{i:02d}{suffix}")
        paths[-1].write_text(text, encoding="utf-8")
    return paths


def files_cfg(tmp_path: Path, path: Path, **overrides) -> DataConfig:
    overrides = {"tokenizer": "byte", **overrides}  # byte: exact streams to compare (auto would train a BPE)
    return DataConfig(source="files", path=str(path), cache_dir=str(tmp_path / "cache"), **overrides)


def all_tokens(data) -> np.ndarray:
    return np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val.tokens)]).astype(np.int64)


def small_bpe_corpus() -> list[str]:
    words = ["return", "self", "def", "import", "value", "lambda", "print", "class"]
    return [f"{words[i % 8]} {words[(i * 3) % 8]}_{i % 5} = {i} + {words[(i * 5) % 8]}\n" for i in range(400)]


# --- tokenizers ---------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert tok.decode(ids + [tok.eot_id]) == UNICODE  # the end-of-text id decodes to nothing
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert [a.tolist() for a in tok.encode_batch(DOCS)] == [tok.encode(d) for d in DOCS]


def test_bpe_round_trips_and_compresses(tmp_path):
    corpus = small_bpe_corpus()
    tok = train_bpe(corpus, vocab_size=300)
    tok.save(tmp_path / "saved")  # as a Hugging Face tokenizer directory, for the run dir and export
    saved = load_pretrained_tokenizer(str(tmp_path / "saved"))
    assert saved.eos_id == tok.eot_id and saved.vocab_size == tok.vocab_size and saved.bos_id is None
    assert saved.encode(UNICODE) == tok.encode(UNICODE)
    assert tok.eot_id == tok.backend.token_to_id("<|endoftext|>")
    assert 257 < tok.vocab_size <= 300
    for text in [corpus[7], UNICODE, "unseen words: zebra quokka\t\n"]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("".join(corpus))) < 0.6 * len("".join(corpus).encode())
    assert [a.tolist() for a in tok.encode_batch(corpus[:3])] == [tok.encode(t) for t in corpus[:3]]


def test_bpe_is_trained_once_then_reused(tmp_path, monkeypatch):
    write_docs(tmp_path / "corpus", small_bpe_corpus())
    cfg = files_cfg(tmp_path, tmp_path / "corpus", tokenizer="bpe", bpe_vocab_size=300, val_fraction=0.1)
    first = build_data(cfg, seq_len=16, seed=0)
    saved = list((tmp_path / "cache").glob("bpe-300-*/tokenizer.json"))
    assert len(saved) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the BPE should have been loaded from the cache")

    monkeypatch.setattr(cache_module, "train_bpe", no_training)
    second = build_data(cfg, seq_len=16, seed=0)
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert "cache hit" in second.describe()
    # Documents are joined by the BPE's own end-of-text id
    stream = all_tokens(second)
    assert stream[-1] == second.tokenizer.eot_id
    assert (stream == second.tokenizer.eot_id).sum() == len(small_bpe_corpus())


def _trained_backend():
    return train_bpe(small_bpe_corpus() + [UNICODE], vocab_size=320).backend


def test_local_hf_tokenizer_directory(tmp_path):
    from transformers import PreTrainedTokenizerFast

    reference = PreTrainedTokenizerFast(tokenizer_object=_trained_backend(), eos_token="<|endoftext|>")
    reference.save_pretrained(tmp_path / "tok")
    tok = load_pretrained_tokenizer(str(tmp_path / "tok"))
    assert tok.eot_id == reference.eos_token_id
    assert tok.vocab_size == len(reference)
    assert tok.encode(UNICODE) == reference.encode(UNICODE, add_special_tokens=False)
    assert tok.decode(tok.encode(UNICODE)) == UNICODE

    write_docs(tmp_path / "corpus", DOCS * 20)
    data = build_data(files_cfg(tmp_path, tmp_path / "corpus", tokenizer=str(tmp_path / "tok")), 8, 0)
    expected = np.concatenate([tok.encode(d) + [tok.eot_id] for d in DOCS * 20])
    np.testing.assert_array_equal(all_tokens(data), expected)


def test_hf_tokenizer_directory_without_tokenizer_json(tmp_path):
    """A GPT-2 style vocab.json + merges.txt directory loads through transformers.AutoTokenizer."""
    backend = _trained_backend()
    (tmp_path / "tok").mkdir()
    backend.model.save(str(tmp_path / "tok"))
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
    }
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_pretrained_tokenizer(str(tmp_path / "tok"))
    assert tok.eot_id == backend.token_to_id("<|endoftext|>")
    assert tok.encode(UNICODE) == backend.encode(UNICODE).ids
    assert tok.decode(tok.encode(UNICODE)) == UNICODE


# --- files source, cache and packing ------------------------------------------------------------


def test_files_source_reads_each_format_in_sorted_order(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / "a.txt").write_text(DOCS[0])
    (root / "b" / "deep" / "c.md").write_text(DOCS[1])
    (root / "b" / "d.jsonl").write_text(
        json.dumps({"text": DOCS[2], "id": 1}) + "\n\n" + json.dumps({"text": DOCS[3]}) + "\n"
    )
    (root / "e.json").write_text(json.dumps([{"text": "object one"}, {"text": "object two"}]))
    (root / "f.json").write_text(json.dumps(["string one", "string two"]))
    (root / "g.py").write_text("x = 1\n")
    (root / "ignored.bin").write_text("not text")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "h.txt").write_text("hidden")
    data = build_data(files_cfg(tmp_path, root, val_fraction=0.1), seq_len=4, seed=0)
    order = [
        DOCS[0],
        DOCS[2],
        DOCS[3],
        DOCS[1],
        "object one",
        "object two",
        "string one",
        "string two",
        "x = 1\n",
    ]
    np.testing.assert_array_equal(all_tokens(data), byte_stream(order))
    assert data.documents == len(order)


def test_files_source_single_file(tmp_path):
    (tmp_path / "one.txt").write_text(UNICODE * 10)
    data = build_data(files_cfg(tmp_path, tmp_path / "one.txt"), seq_len=4, seed=0)
    np.testing.assert_array_equal(all_tokens(data), byte_stream([UNICODE * 10]))


def test_packing_matches_the_raw_stream(tmp_path):
    write_docs(tmp_path / "corpus", DOCS * 3)
    seq_len = 8
    data = build_data(files_cfg(tmp_path, tmp_path / "corpus", val_fraction=0.25), seq_len, seed=0)
    stream = byte_stream(DOCS * 3)
    split = len(stream) - int(len(stream) * 0.25)
    assert data.train.num_tokens == split and data.val.num_tokens == len(stream) - split
    for part, tokens in ((data.train, stream[:split]), (data.val, stream[split:])):
        assert len(part) == (len(tokens) - 1) // seq_len
        x, y = part.get_batch(np.arange(len(part))[::-1])  # any order of indices
        assert x.shape == y.shape == (len(part), seq_len) and x.dtype == y.dtype == torch.int64
        for row, i in enumerate(range(len(part))[::-1]):
            np.testing.assert_array_equal(x[row].numpy(), tokens[i * seq_len : (i + 1) * seq_len])
            np.testing.assert_array_equal(y[row].numpy(), tokens[i * seq_len + 1 : (i + 1) * seq_len + 1])
        assert (y[:, :-1] == x[:, 1:]).all()
    with pytest.raises(IndexError):
        data.train.get_batch(np.array([len(data.train)]))


def test_cache_hit_reads_no_document(tmp_path, monkeypatch):
    paths = write_docs(tmp_path / "corpus", DOCS)
    cfg = files_cfg(tmp_path, tmp_path / "corpus", val_fraction=0.1)
    first = build_data(cfg, seq_len=4, seed=0)
    assert "cache built" in first.describe()
    (meta_path,) = (tmp_path / "cache").glob("files-byte-*/meta.json")
    meta = json.loads(meta_path.read_text())
    stream = byte_stream(DOCS)
    assert meta["tokens"] == len(stream) and meta["dtype"] == "uint16" and meta["documents"] == len(DOCS)
    assert meta["train_unigram_entropy"] == pytest.approx(unigram_entropy(stream[: meta["split"]], 257))
    mtime = meta_path.stat().st_mtime_ns

    def no_reading(path):
        raise AssertionError(f"a cache hit read {path}")

    monkeypatch.setattr(sources_module, "read_text", no_reading)
    second = build_data(cfg, seq_len=4, seed=0)
    assert "cache hit" in second.describe()
    assert meta_path.stat().st_mtime_ns == mtime
    np.testing.assert_array_equal(all_tokens(second), stream)
    assert second.unigram_entropy == first.unigram_entropy

    monkeypatch.undo()  # an edited file changes the source's identity: a new entry is built
    paths[0].write_text("changed\n")
    third = build_data(cfg, seq_len=4, seed=0)
    assert "cache built" in third.describe()
    np.testing.assert_array_equal(all_tokens(third), byte_stream(["changed\n"] + DOCS[1:]))


def test_new_val_fraction_reuses_the_cache(tmp_path):
    write_docs(tmp_path / "corpus", DOCS * 4)
    build_data(files_cfg(tmp_path, tmp_path / "corpus", val_fraction=0.1), 4, 0)
    data = build_data(files_cfg(tmp_path, tmp_path / "corpus", val_fraction=0.3), 4, 0)
    stream = byte_stream(DOCS * 4)
    split = len(stream) - int(len(stream) * 0.3)
    assert "cache hit" in data.describe() and data.train.num_tokens == split
    assert data.unigram_entropy == pytest.approx(unigram_entropy(stream[:split], 257))


def test_token_dtype():
    assert token_dtype(257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(128_256) == np.uint32


# --- Hugging Face datasets ----------------------------------------------------------------------


def hf_cfg(tmp_path: Path, path: Path, **overrides) -> DataConfig:
    overrides = {"tokenizer": "byte", **overrides}
    return DataConfig(source="hf", path=str(path), cache_dir=str(tmp_path / "cache"), **overrides)


def test_hf_dataset_saved_to_disk(tmp_path):
    import datasets

    texts = DOCS * 5
    datasets.Dataset.from_dict({"text": texts, "n": list(range(len(texts)))}).save_to_disk(tmp_path / "ds")
    data = build_data(hf_cfg(tmp_path, tmp_path / "ds"), seq_len=4, seed=0)
    np.testing.assert_array_equal(all_tokens(data), byte_stream(texts))
    capped = build_data(hf_cfg(tmp_path, tmp_path / "ds", max_documents=6), seq_len=4, seed=0)
    np.testing.assert_array_equal(all_tokens(capped), byte_stream(texts[:6]))

    splits = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": ["unused"]}),
            "validation": datasets.Dataset.from_dict({"body": texts}),
        }
    )
    splits.save_to_disk(tmp_path / "dd")
    cfg = hf_cfg(tmp_path, tmp_path / "dd", hf_split="validation", text_field="body")
    np.testing.assert_array_equal(all_tokens(build_data(cfg, 4, 0)), byte_stream(texts))


def test_hf_local_jsonl_directory(tmp_path):
    texts = DOCS * 5
    (tmp_path / "jsonl").mkdir()
    for part in range(2):
        lines = [json.dumps({"text": t}) for t in texts[part * 10 : (part + 1) * 10]]
        (tmp_path / "jsonl" / f"part{part}.jsonl").write_text("\n".join(lines) + "\n")
    data = build_data(hf_cfg(tmp_path, tmp_path / "jsonl"), seq_len=4, seed=0)
    np.testing.assert_array_equal(all_tokens(data), byte_stream(texts))
    # streaming: document 0 is validation (every 50th at val_fraction 0.02), 1..6 train, read on the fly
    streamed = build_data(hf_cfg(tmp_path, tmp_path / "jsonl", streaming=True, max_documents=7), 4, 0)
    x, y = streamed.train.get_batch(np.array([0, 1]))
    stream = byte_stream(texts[1:7])
    np.testing.assert_array_equal(x.numpy(), [stream[0:4], stream[4:8]])
    np.testing.assert_array_equal(y.numpy(), [stream[1:5], stream[5:9]])
    np.testing.assert_array_equal(np.asarray(streamed.val.tokens), byte_stream(texts[:1])[: len(streamed.val.tokens)])


def test_hf_missing_column_names_text_field(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"content": DOCS}).save_to_disk(tmp_path / "ds")
    with pytest.raises(ConfigError, match=r"data.text_field='text' is not a column.*content"):
        build_data(hf_cfg(tmp_path, tmp_path / "ds"), seq_len=4, seed=0)


# --- synthetic Markov chain ---------------------------------------------------------------------


def test_entropy_rate_analytic_cases():
    vocab = 7
    assert entropy_rate(np.full((vocab, vocab), 1 / vocab)) == pytest.approx(math.log(vocab))
    cycle = np.roll(np.eye(vocab), 1, axis=1)  # deterministic: 0 -> 1 -> ... -> 6 -> 0
    assert entropy_rate(cycle) == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_allclose(stationary_distribution(cycle), np.full(vocab, 1 / vocab))
    a, b = 0.1, 0.4  # two states: pi = (b, a) / (a + b), H = pi_0 h(a) + pi_1 h(b)

    def h(p):
        return -p * math.log(p) - (1 - p) * math.log(1 - p)

    two = np.array([[1 - a, a], [b, 1 - b]])
    np.testing.assert_allclose(stationary_distribution(two), [b / (a + b), a / (a + b)])
    assert entropy_rate(two) == pytest.approx((b * h(a) + a * h(b)) / (a + b))


def test_entropy_rate_matches_an_empirical_estimate():
    rng = np.random.default_rng(0)
    transitions = markov_chain(16, 0.5, rng)
    states = sample_chain(transitions, 300_000, rng)
    pairs = np.bincount(states[:-1] * 16 + states[1:], minlength=256).reshape(16, 16)
    joint = pairs / pairs.sum()
    conditional = pairs / np.maximum(pairs.sum(axis=1, keepdims=True), 1)
    mask = pairs > 0
    empirical = -(joint[mask] * np.log(conditional[mask])).sum()
    true_rate = entropy_rate(transitions)
    assert empirical == pytest.approx(true_rate, abs=0.01)
    assert -np.log(transitions[states[:-1], states[1:]]).mean() == pytest.approx(true_rate, abs=0.01)
    visits = np.bincount(states, minlength=16) / len(states)
    np.testing.assert_allclose(visits, stationary_distribution(transitions), atol=0.01)


def test_build_data_synthetic(tmp_path):
    cfg = DataConfig(source="synthetic", synthetic_vocab=32, synthetic_tokens=50_000, cache_dir=str(tmp_path))
    data = build_data(cfg, seq_len=16, seed=3)
    tokens = all_tokens(data)
    assert len(tokens) == 50_000 and tokens.min() >= 0 and tokens.max() < 32
    assert data.tokenizer.vocab_size == 32 and data.tokenizer.eot_id is None
    assert 0 < data.entropy_rate < data.unigram_entropy < math.log(32)
    np.testing.assert_array_equal(all_tokens(build_data(cfg, 16, seed=3)), tokens)
    assert (all_tokens(build_data(cfg, 16, seed=4)) != tokens).any()
    assert data.tokenizer.decode(data.tokenizer.encode("3 1 4")) == "3 1 4"
    assert not any(tmp_path.iterdir())  # generated, never cached


# --- stdlib -------------------------------------------------------------------------------------


def test_stdlib_source_finds_the_standard_library(tmp_path):
    files = stdlib_files()
    root = stdlib_root()
    assert len(files) > 500 and sum(p.stat().st_size for p in files) > 5_000_000
    assert files == sorted(files) and all(p.suffix == ".py" for p in files)
    assert not any(set(p.relative_to(root).parts) & STDLIB_SKIP_DIRS for p in files)
    assert root / "json" / "decoder.py" in files

    start = time.perf_counter()
    data = build_data(DataConfig(cache_dir=str(tmp_path)), seq_len=256, seed=0)
    seconds = time.perf_counter() - start
    print(f"stdlib byte tokenization: {seconds:.2f}s; {data.describe()}")
    assert data.train.num_tokens + data.val.num_tokens > 5_000_000
    x, _ = data.train.get_batch(np.array([0]))
    assert bytes(x[0].tolist()) == files[0].read_bytes()[:256]  # __future__.py comes first


# --- config errors ------------------------------------------------------------------------------


def test_missing_path_is_reported_before_any_work(tmp_path):
    for source in ("files", "hf"):
        cfg = DataConfig(source=source, path=str(tmp_path / "nope"), cache_dir=str(tmp_path / "cache"))
        with pytest.raises(ConfigError, match=r"data.path=.*nope does not exist: point it at"):
            build_data(cfg, seq_len=4, seed=0)
    assert not (tmp_path / "cache").exists()


def test_unknown_tokenizer_path(tmp_path):
    write_docs(tmp_path / "corpus", DOCS)
    cfg = files_cfg(tmp_path, tmp_path / "corpus", tokenizer=str(tmp_path / "no-tokenizer"))
    with pytest.raises(ConfigError, match=r"data.tokenizer=.*no-tokenizer is not byte, bpe or"):
        build_data(cfg, seq_len=4, seed=0)
    assert not (tmp_path / "cache").exists()


def test_empty_corpus(tmp_path):
    (tmp_path / "none").mkdir()
    (tmp_path / "none" / "data.csv").write_text("a,b\n")
    with pytest.raises(ConfigError, match=r"data.path=.*none is empty.*data.extensions"):
        build_data(files_cfg(tmp_path, tmp_path / "none"), seq_len=4, seed=0)
    write_docs(tmp_path / "blank", ["", ""])
    with pytest.raises(ConfigError, match=r"data.path=.*blank is empty"):
        build_data(files_cfg(tmp_path, tmp_path / "blank"), seq_len=4, seed=0)
    assert not list((tmp_path / "cache").glob("*/tokens.bin*"))  # no half-written cache left


def test_split_too_small(tmp_path):
    write_docs(tmp_path / "corpus", ["x" * 999])  # 1000 tokens with the end-of-text id
    cfg = files_cfg(tmp_path, tmp_path / "corpus", val_fraction=0.01)
    with pytest.raises(
        ConfigError,
        match=r"^validation split holds 10 tokens, fewer than "
        r"train.seq_len\+1=65: lower train.seq_len or raise data.val_fraction$",
    ):
        build_data(cfg, seq_len=64, seed=0)
    with pytest.raises(ConfigError, match=r"^train split holds .* lower train.seq_len"):
        build_data(cfg, seq_len=2000, seed=0)
    assert len(build_data(cfg, seq_len=9, seed=0).val) == 1


def test_jsonl_without_the_text_field(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(ConfigError, match=r"a.jsonl line 1 has no field data.text_field='text'"):
        build_data(files_cfg(tmp_path, tmp_path / "c"), seq_len=4, seed=0)
    (tmp_path / "c" / "a.jsonl").write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ConfigError, match=r"a.jsonl line 2 is not valid JSON"):
        build_data(files_cfg(tmp_path, tmp_path / "c"), seq_len=4, seed=0)


def test_unloadable_dataset_directory(tmp_path):
    (tmp_path / "notds").mkdir()
    (tmp_path / "notds" / "weights.bin").write_bytes(b"\0")
    with pytest.raises(ConfigError, match=r"data.path=.*notds could not be loaded .*: point data.path"):
        build_data(hf_cfg(tmp_path, tmp_path / "notds"), seq_len=4, seed=0)


@pytest.mark.parametrize("name", ["stdlib", "files", "hf", "synthetic", "instruct", "chat"])
def test_data_group_files_compose_into_data_config(name):
    from omegaconf import OmegaConf

    path = Path(__file__).parents[1] / "configs" / "data" / f"{name}.yaml"
    assert path.read_text().startswith(f"# python -m trainer data={name}")
    merged = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path))
    if name not in ("stdlib", "synthetic"):
        merged.path = "/some/corpus"
    config = OmegaConf.to_object(merged)
    assert isinstance(config, DataConfig) and config.tokenizer is None  # auto: the model's own when pretrained
    assert (config.source, config.format) == {"instruct": ("files", "instruct"), "chat": ("files", "chat")}.get(
        name, (name, "text")
    )
