"""python -m trainer.data.prepare: token shards with a document index and checksums; N workers
write the bytes one writes; a killed prepare resumes to the same output; bad input is one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from helpers import env

from trainer.data.prepare import main, open_prepare_source, prepare
from trainer.data.shards import shard_name
from trainer.data.tokenizer import ByteTokenizer

REPO = Path(__file__).resolve().parent.parent
WORDS = "the of and to in is was for on that with as by at from his her it an".split()


def write_corpus(path: Path, documents: int, seed: int = 0, vocabulary: list[str] | None = None) -> list[str]:
    """A .jsonl file of `documents` records {"text": ...} of 1-60 words (every 7th empty: not a
    document); returns the non-empty texts in order."""
    rng = np.random.default_rng(seed)
    words = vocabulary or WORDS
    texts = [
        "" if i % 7 == 6 else " ".join(rng.choice(words, size=int(rng.integers(1, 60)))) + f" ({i})"
        for i in range(documents)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return [t for t in texts if t]


def byte_stream(texts: list[str]) -> np.ndarray:
    """The byte tokenizer's stream of `texts`: each one's bytes, then eot 256."""
    return np.concatenate([np.array([*t.encode(), 256], dtype=np.int64) for t in texts])


def shard_stream(directory: Path) -> np.ndarray:
    """Every shard of a prepared directory, concatenated in order."""
    meta = json.loads((directory / "meta.json").read_text())
    return np.concatenate([np.fromfile(directory / s["file"], dtype=meta["dtype"]) for s in meta["shards"]])


def files_of(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def prepared(source: Path, out: Path, shard_tokens: int, tokenizer=None) -> dict:
    """prepare() in this process, quietly; returns meta.json."""
    return prepare(
        open_prepare_source(str(source), "text", None), tokenizer or ByteTokenizer(), out,
        shard_tokens=shard_tokens, echo=lambda line: None,
    )  # fmt: skip


def test_the_shards_hold_the_document_stream_with_its_index_and_checksums(tmp_path: Path) -> None:
    texts = write_corpus(tmp_path / "corpus.jsonl", 200)
    meta = prepared(tmp_path / "corpus.jsonl", tmp_path / "out", shard_tokens=1000)
    stream = byte_stream(texts)
    np.testing.assert_array_equal(shard_stream(tmp_path / "out"), stream)
    assert meta["dtype"] == "uint16" and meta["tokens"] == len(stream) and meta["documents"] == len(texts)
    assert meta["tokenizer"] == {"name": "byte", "fingerprint": "byte", "vocab_size": 257, "eot_id": 256, "files": None}
    shards = meta["shards"]
    assert [s["tokens"] for s in shards] == [1000] * (len(stream) // 1000) + [len(stream) % 1000]
    starts = np.concatenate([[0], np.cumsum([len(t.encode()) + 1 for t in texts])[:-1]])
    indexed = [np.fromfile(tmp_path / "out" / s["index"], dtype=np.int64) + 1000 * k for k, s in enumerate(shards)]
    np.testing.assert_array_equal(np.concatenate(indexed), starts)  # every document's start, in its shard
    assert [s["documents"] for s in shards] == [len(i) for i in indexed]
    for s in shards:
        for name, key in (("file", "sha256"), ("index", "index_sha256")):
            assert hashlib.sha256((tmp_path / "out" / s[name]).read_bytes()).hexdigest() == s[key]
    counts = np.load(tmp_path / "out" / "unigram.npy")
    np.testing.assert_array_equal(counts, np.bincount(stream, minlength=257))
    p = counts[counts > 0] / counts.sum()
    assert meta["unigram_entropy"] == pytest.approx(float(-(p * np.log(p)).sum()), rel=1e-12)


class WideTokenizer(ByteTokenizer):
    """Bytes shifted past 65,536: a vocabulary that needs uint32."""

    vocab_size, eot_id, name = 70_000, 69_999, "wide"

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [ids.astype(np.int64) + 65_600 for ids in super().encode_batch(texts)]

    def fingerprint(self) -> str:
        return "wide"

    def save(self, directory: Path) -> None:
        Path(directory).mkdir()


def test_a_vocabulary_over_65536_ids_is_stored_as_uint32(tmp_path: Path) -> None:
    texts = write_corpus(tmp_path / "corpus.jsonl", 30)
    meta = prepared(tmp_path / "corpus.jsonl", tmp_path / "out", 500, WideTokenizer())
    assert meta["dtype"] == "uint32"
    expected = np.where(byte_stream(texts) == 256, 69_999, byte_stream(texts) + 65_600)
    np.testing.assert_array_equal(shard_stream(tmp_path / "out"), expected)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_three_workers_write_the_bytes_one_worker_writes(tmp_path: Path, tokenizer: str) -> None:
    write_corpus(tmp_path / "corpus.jsonl", 1500)
    outputs = {}
    for workers in (1, 3):
        out = tmp_path / f"out{workers}"
        args = [str(tmp_path / "corpus.jsonl"), "--out", str(out), "--workers", str(workers), "--tokenizer", tokenizer]
        assert main([*args, "--shard-tokens", "3000", "--bpe-vocab-size", "300", "--cache-dir", str(tmp_path)]) == 0
        outputs[workers] = files_of(out)
    assert outputs[1] == outputs[3]  # every shard, index, record, meta.json and the tokenizer's files
    meta = json.loads(outputs[1]["meta.json"])
    assert len(meta["shards"]) > 3 and meta["documents"] > 1000  # many chunks (256 documents each), many shards
    if tokenizer == "bpe":  # the BPE goes with the shards, and it is the one they were made with
        assert "tokenizer.json" in outputs[1] and meta["tokenizer"]["name"] == "bpe"


def test_a_killed_prepare_resumes_to_the_same_output(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """SIGKILL the prepare process (2 workers) after a few shards, damage its last finished shard,
    and run it again: it verifies, drops the damaged shard, resumes there and ends with the bytes
    of a prepare never interrupted. The killed process's workers exit on their own."""
    write_corpus(tmp_path / "corpus.jsonl", 1000)
    shards = len(prepared(tmp_path / "corpus.jsonl", tmp_path / "reference", shard_tokens=4000)["shards"])
    out = tmp_path / "out"
    args = [str(tmp_path / "corpus.jsonl"), "--out", str(out), "--workers", "2", "--shard-tokens", "4000"]
    process = subprocess.Popen(
        [sys.executable, "-m", "trainer.data.prepare", *args], cwd=REPO, env=env(),
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while len(list(out.glob("shard-*.json"))) < 4:
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read().decode()[-2000:]
        time.sleep(0.002)
    workers = psutil.Process(process.pid).children()
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(workers) == 2 and not (out / "meta.json").exists()
    psutil.wait_procs(workers, timeout=10)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finished = len(list(out.glob("shard-*.json")))
    assert 4 <= finished < shards
    damaged = out / f"{shard_name(finished - 1)}.bin"
    data = bytearray(damaged.read_bytes())
    data[100] ^= 0xFF
    damaged.write_bytes(bytes(data))

    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"resuming after {finished - 1} verified shards" in printed
    assert "tokens/s" in printed.splitlines()[-1]
    assert files_of(out) == files_of(tmp_path / "reference")
    assert main(args) == 0 and f"already prepared ({shards} shards verified)" in capsys.readouterr().out
    assert files_of(out) == files_of(tmp_path / "reference")


def test_bad_input_is_one_line_with_exit_code_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_corpus(tmp_path / "corpus.jsonl", 20)
    source = str(tmp_path / "corpus.jsonl")
    result = subprocess.run(
        [sys.executable, "-m", "trainer.data.prepare", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")],
        cwd=REPO, env=env(), capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: data.path={tmp_path / 'missing.jsonl'} does not exist: point it at a file, a glob, a directory or "
        "a dataset"
    ]
    assert not (tmp_path / "o").exists()
    assert main([source, "--out", str(tmp_path / "a"), "--shard-tokens", "100"]) == 0
    capsys.readouterr()
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    cases = [
        ([source, "--out", str(tmp_path / "a"), "--shard-tokens", "200"], "holds shards of another prepare"),
        ([source, "--out", str(tmp_path / "a"), "--shard-tokens", "100", "--tokenizer", str(tmp_path)], "holds no tokenizer files"),
        ([source, "--out", str(tmp_path / "foreign")], "is not empty and was not written by prepare"),
        ([source, "--out", str(tmp_path / "b"), "--workers", "0"], "--workers=0: use 1 or more"),
    ]  # fmt: skip
    for args, expected in cases:
        assert main(args) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err
    assert (tmp_path / "foreign" / "notes.txt").read_text() == "mine"
