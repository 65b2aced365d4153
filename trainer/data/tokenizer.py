"""Text <-> token ids: UTF-8 bytes, a byte-level BPE trained on the corpus, a local Hugging Face
tokenizer, or the identity map of the synthetic source.

Every tokenizer offers the same small interface: `vocab_size`, `eot_id` (the id put after each
document), `encode`, `decode`, `encode_batch` (numpy arrays, for building the token cache fast)
and `fingerprint()` (a string that changes whenever the mapping does: it keys the token cache).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from trainer.config import ConfigError

EOT_TOKEN = "<|endoftext|>"
# Names tried, in order, for a tokenizer.json whose directory does not name its eos token.
EOS_CANDIDATES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 ends a document."""

    vocab_size = 257
    eot_id = 256
    name = "byte"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # frombuffer views the encoded bytes: no per-character Python work
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def fingerprint(self) -> str:
        return "byte"


class IdentityTokenizer:
    """The synthetic source's tokens are already ids 0..vocab_size-1; there is no document end.

    `encode` reads space-separated integers ("3 1 4"); any other text maps each UTF-8 byte to
    byte % vocab_size, so that a text prompt still gives valid ids. `decode` writes integers.
    """

    eot_id = None
    name = "identity"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        words = text.split()
        if words and all(w.isdigit() and int(w) < self.vocab_size for w in words):
            return [int(w) for w in words]
        return [b % self.vocab_size for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in ids)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(self.encode(text), dtype=np.int64) for text in texts]

    def fingerprint(self) -> str:
        return f"identity-{self.vocab_size}"


class HFTokenizer:
    """A `tokenizers.Tokenizer` (trained here as BPE, or loaded from a tokenizer directory)."""

    def __init__(self, backend: tokenizers.Tokenizer, eot_id: int, name: str):
        self.backend = backend
        self.eot_id = eot_id
        self.name = name  # "bpe" or "hf": names the cache directory
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        serialized = backend.to_str() + f"\neot={eot_id}"
        self._fingerprint = f"{name}-" + hashlib.sha256(serialized.encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        # No BOS / template tokens: documents are joined by eot_id alone.
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def fingerprint(self) -> str:
        return self._fingerprint


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer and byte alphabet) with <|endoftext|> as id 0."""
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(backend, backend.token_to_id(EOT_TOKEN), "bpe")


def load_bpe(path: Path) -> HFTokenizer:
    """A BPE written by `train_bpe(...).backend.save(path)`."""
    backend = tokenizers.Tokenizer.from_file(str(path))
    return HFTokenizer(backend, backend.token_to_id(EOT_TOKEN), "bpe")


def check_tokenizer_setting(tokenizer: str) -> None:
    """Fail fast on data.tokenizer: byte, bpe, or an existing directory."""
    if tokenizer in ("byte", "bpe"):
        return
    if not Path(tokenizer).expanduser().is_dir():
        raise ConfigError(
            f"data.tokenizer={tokenizer} is not byte, bpe or an existing directory: "
            "point it at a local Hugging Face tokenizer directory (with tokenizer.json)"
        )


def load_hf_tokenizer(directory: str) -> HFTokenizer:
    """A local Hugging Face tokenizer directory; its eos token separates documents."""
    path = Path(directory).expanduser()
    check_tokenizer_setting(directory)
    if (path / "tokenizer.json").exists():
        backend = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
        eos_id = _eos_from_files(path, backend)
    else:
        backend, eos_id = _load_with_transformers(path, directory)
    if eos_id is None:
        raise ConfigError(
            f"data.tokenizer={directory} names no end-of-text token: set eos_token in its tokenizer_config.json"
        )
    return HFTokenizer(backend, eos_id, "hf")


def _load_with_transformers(path: Path, directory: str) -> tuple[tokenizers.Tokenizer, int | None]:
    from transformers import AutoTokenizer  # slow import; only directories without tokenizer.json

    try:
        loaded = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        raise ConfigError(
            f"data.tokenizer={directory} is not a loadable tokenizer directory "
            f"({type(error).__name__}): it needs tokenizer.json or files that "
            "transformers.AutoTokenizer reads"
        ) from error
    backend = getattr(loaded, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(
            f"data.tokenizer={directory} loads only as a slow tokenizer: save it "
            "with a fast tokenizer so that the directory holds tokenizer.json"
        )
    return backend, loaded.eos_token_id


def _eos_from_files(path: Path, backend: tokenizers.Tokenizer) -> int | None:
    """The eos id named by tokenizer_config.json / special_tokens_map.json / config.json."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (path / name).exists():
            token = json.loads((path / name).read_text()).get("eos_token")
            if isinstance(token, dict):  # serialized AddedToken
                token = token.get("content")
            if isinstance(token, str) and backend.token_to_id(token) is not None:
                return backend.token_to_id(token)
    if (path / "config.json").exists():
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int):
            return eos
    for token in EOS_CANDIDATES:
        if backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
    return None
