"""Text <-> token ids: UTF-8 bytes, a byte-level BPE trained on the corpus, a local Hugging Face
tokenizer (the pretrained model's own, or data.tokenizer=DIR), or the synthetic source's identity map.

Every tokenizer offers the same small interface: `vocab_size`, `eot_id` (the id put after each
document), `encode`, `decode`, `encode_batch` (numpy arrays, for building the token cache fast)
and `fingerprint()` (a string that changes whenever the mapping does: it keys the caches).
`encode(text)` adds what the model expects at the start of a text (a Llama 3 tokenizer's
<|begin_of_text|>; nothing for GPT-2, bytes or the BPE); `add_special_tokens=False` adds nothing.
A Hugging Face tokenizer (`PretrainedTokenizer`) also has bos / eos / pad ids, its chat template,
its family's chat quirks (trainer.model.families: whether the template has a system turn, the tokens
that end an assistant turn), the ids that stop generation, and `save(directory)`. `to_hf` gives any
text tokenizer as a transformers one (bytes included), for lm_eval and export.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from trainer.config import MODEL_TYPES, ConfigError, DataConfig

if TYPE_CHECKING:
    from trainer.model.families import ChatQuirks

EOT_TOKEN = "<|endoftext|>"
# Names tried, in order, for a tokenizer.json whose directory does not name its eos token.
EOS_CANDIDATES = (EOT_TOKEN, "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")


class Tokenizer(Protocol):
    vocab_size: int
    eot_id: int | None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...
    def encode_batch(self, texts: list[str]) -> list[np.ndarray]: ...
    def fingerprint(self) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; id 256 ends a document."""

    vocab_size = 257
    eot_id = 256
    name = "byte"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        # frombuffer views the encoded bytes: no per-character Python work
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8) for text in texts]

    def fingerprint(self) -> str:
        return "byte"

    def hf(self) -> Any:
        """The same mapping as a transformers PreTrainedTokenizerFast (for lm_eval, export, transformers):
        a BPE with no merges over GPT-2's byte alphabet, ordered so that byte b is id b, and
        <|endoftext|> (id 256) as eos. It adds no special tokens, and `split_special_tokens` keeps the
        literal text "<|endoftext|>" as its 13 bytes, as `encode` does: every text gets `encode(text)`."""
        from transformers import PreTrainedTokenizerFast

        vocab = {char: byte for byte, char in byte_alphabet().items()}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([tokenizers.AddedToken(EOT_TOKEN, special=True)])  # the next id: 256
        return PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token=EOT_TOKEN, split_special_tokens=True,
            clean_up_tokenization_spaces=False,  # decode gives the text back, " ." and all
        )  # fmt: skip


def byte_alphabet() -> dict[int, str]:
    """GPT-2's printable stand-in for each byte (the characters of ByteLevel's pre-tokenizer output):
    printable Latin-1 bytes stand for themselves, the others get chr(256), chr(257), ... in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # "!".."~", "¡".."¬", "®".."ÿ"
    others = iter(range(256, 512))
    return {b: chr(b if b in printable else next(others)) for b in range(256)}


class IdentityTokenizer:
    """The synthetic source's tokens are already ids 0..vocab_size-1; there is no document end.

    `encode` reads space-separated integers ("3 1 4"); any other text maps each UTF-8 byte to
    byte % vocab_size, so that a text prompt still gives valid ids. `decode` writes integers.
    """

    eot_id = None
    name = "identity"

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
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
    """A `tokenizers.Tokenizer` trained here as a BPE (no BOS; <|endoftext|> ends documents)."""

    def __init__(self, backend: tokenizers.Tokenizer, eot_id: int, name: str):
        self.backend = backend
        self.eot_id = eot_id
        self.name = name  # "bpe": names the cache directory
        self.vocab_size = max(backend.get_vocab(with_added_tokens=True).values()) + 1
        serialized = backend.to_str() + f"\neot={eot_id}"
        self._fingerprint = f"{name}-" + hashlib.sha256(serialized.encode()).hexdigest()[:16]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # No BOS / template tokens: documents are joined by eot_id alone.
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [np.asarray(e.ids, dtype=np.int64) for e in encode(texts, add_special_tokens=False)]

    def fingerprint(self) -> str:
        return self._fingerprint

    def save(self, directory: str | Path) -> None:
        """A Hugging Face tokenizer directory (tokenizer.json, tokenizer_config.json) for export."""
        to_hf(self).save_pretrained(str(directory))


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


class PretrainedTokenizer:
    """A Hugging Face fast tokenizer loaded through transformers: the pretrained model's own, or
    data.tokenizer=DIR. Documents are encoded with its own special tokens (a Llama 3 tokenizer adds
    <|begin_of_text|>, GPT-2's adds nothing) and end with eos_id, the document separator."""

    name = "hf"

    def __init__(
        self,
        hf: Any,
        eos_id: int,
        model_type: str | None = None,
        quirks: ChatQuirks | None = None,
        extra_stop_ids: Iterable[int] = (),
    ):
        """model_type: the checkpoint's (its family's chat quirks apply unless `quirks` is given);
        extra_stop_ids: more ids that end generation (generation_config.json's eos_token_id)."""
        self.hf = hf  # a transformers TokenizersBackend (PreTrainedTokenizerFast)
        self.backend: tokenizers.Tokenizer = hf.backend_tokenizer
        self.eos_id = self.eot_id = eos_id
        self.model_type = model_type
        self.chat_quirks = quirks if quirks is not None else chat_quirks(model_type)
        # eos, then each end-of-turn token, then the checkpoint's: what trainer.generate and the
        # run's closing sample stop at
        self.stop_ids = stop_ids(eos_id, self.backend.token_to_id, self.chat_quirks, extra_stop_ids)
        self.bos_id: int | None = hf.bos_token_id
        self.pad_id: int | None = hf.pad_token_id
        largest = max(self.backend.get_vocab(with_added_tokens=True).values())
        self.vocab_size = max(len(hf), largest + 1)  # added tokens included
        template = hf.chat_template  # a str, or a dict of named templates
        self.chat_template: str | None = template.get("default") if isinstance(template, dict) else template
        # A post-processor that appends eos itself (rare) must not get a second one after each document.
        self._adds_eos = self.backend.encode("a").ids[-1:] == [eos_id] != self.backend.encode("a", False).ids[-1:]
        specials = {"bos": self.bos_id, "eos": eos_id, "pad": self.pad_id, "chat_template": self.chat_template}
        serialized = self.backend.to_str() + "\n" + json.dumps(specials, sort_keys=True)
        self._fingerprint = "hf-" + hashlib.sha256(serialized.encode()).hexdigest()[:16]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of `text` as it is (no special tokens added) and each token's character span in it."""
        encoding = self.backend.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    def decode(self, ids: Sequence[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=False)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Documents for the token cache (which puts eos_id after each)."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # fast: no offsets
        encoded = [np.asarray(e.ids, dtype=np.int64) for e in encode(texts)]
        return [ids[:-1] for ids in encoded] if self._adds_eos else encoded

    def fingerprint(self) -> str:
        """Changes with the vocabulary, merges, normalisation, special ids or chat template."""
        return self._fingerprint

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = False) -> str:
        """The conversation rendered as text by the tokenizer's chat template (not tokenized)."""
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def save(self, directory: str | Path) -> None:
        """save_pretrained: tokenizer.json, tokenizer_config.json (special tokens) and the chat template;
        and generation_config.json with the stop ids when there are more than eos, so that
        trainer.generate (or a later run) stops at the end-of-turn tokens too."""
        self.hf.save_pretrained(str(directory))
        if len(self.stop_ids) > 1:
            config = {"eos_token_id": list(self.stop_ids)}
            (Path(directory) / "generation_config.json").write_text(json.dumps(config, indent=2) + "\n")


def to_hf(tokenizer: Any) -> Any:
    """The transformers tokenizer of a harness tokenizer (lm_eval's HFLM and export need one): bytes ->
    ByteTokenizer.hf(), the BPE trained here -> its backend with <|endoftext|> as eos, a pretrained
    one -> its own; a transformers tokenizer is returned as it is. Synthetic ids have no text."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.hf()
    if isinstance(tokenizer, HFTokenizer):
        from transformers import PreTrainedTokenizerFast

        eos = tokenizer.backend.id_to_token(tokenizer.eot_id)
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=eos)
    if isinstance(tokenizer, PretrainedTokenizer):
        return tokenizer.hf
    if isinstance(tokenizer, IdentityTokenizer):
        raise ValueError(
            "synthetic data has no text tokenizer: downstream tasks need data=... with a text tokenizer "
            "(data.source=stdlib, files or hf)"
        )
    if hasattr(tokenizer, "get_vocab") and hasattr(tokenizer, "apply_chat_template"):  # already transformers'
        return tokenizer
    raise ValueError(f"{type(tokenizer).__name__} is not a tokenizer of this harness or of transformers")


# Files of which a Hugging Face tokenizer directory holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt")


def choose_tokenizer(cfg: DataConfig, pretrained: str | None) -> str:
    """What the run tokenizes with: byte, bpe or a tokenizer directory. data.tokenizer=null (auto)
    is the pretrained model's own tokenizer with model.pretrained, else byte for stdlib and
    instruct records, bpe for files / hf text. Settings that cannot work fail here, before any work."""
    setting = cfg.tokenizer
    if setting is None:
        if pretrained:
            return pretrained
        if cfg.format == "chat":
            raise ConfigError(
                "data.format=chat renders conversations with a tokenizer's chat template: set "
                "model.pretrained=DIR or data.tokenizer=DIR (a Hugging Face tokenizer with a chat template)"
            )
        return "byte" if cfg.source == "stdlib" or cfg.format == "instruct" else "bpe"
    if setting in ("byte", "bpe"):
        if pretrained:
            own = 257 if setting == "byte" else cfg.bpe_vocab_size
            raise ConfigError(
                f"data.tokenizer={setting} (vocabulary {own}) is not the tokenizer of model.pretrained={pretrained} "
                f"(vocab_size {checkpoint_vocab_size(pretrained)} in its config.json): drop data.tokenizer to use "
                "the model's own, or set data.tokenizer=DIR"
            )
        if cfg.format != "text" and (setting == "bpe" or cfg.format == "chat"):
            raise ConfigError(
                f"data.tokenizer={setting} cannot serve data.format={cfg.format}: use "
                + ("data.tokenizer=byte, " if cfg.format == "instruct" else "")
                + "model.pretrained=DIR or data.tokenizer=DIR (a Hugging Face tokenizer)"
            )
        return setting
    if not Path(setting).expanduser().is_dir():
        raise ConfigError(
            f"data.tokenizer={setting} is not byte, bpe or an existing directory: "
            "point it at a local Hugging Face tokenizer directory (with tokenizer.json)"
        )
    return setting


def checkpoint_vocab_size(pretrained: str) -> int | str:
    """vocab_size in a checkpoint's config.json (or its text_config), or '?' if it names none."""
    path = Path(pretrained).expanduser() / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or "?"


def load_pretrained_tokenizer(directory: str, key: str = "data.tokenizer") -> PretrainedTokenizer:
    """The fast tokenizer in `directory` (through transformers.AutoTokenizer, local files only);
    `key` names the setting that pointed there, for error messages."""
    path = Path(directory).expanduser()
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        fix = "pass data.tokenizer=DIR naming the model's tokenizer directory" if key == "model.pretrained" else ""
        raise ConfigError(
            f"{key}={directory} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}): "
            + (fix or "point it at a local Hugging Face tokenizer directory")
        )
    from transformers import AutoTokenizer  # slow import: only runs that use such a tokenizer pay it

    try:
        hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as error:
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(
            f"{key}={directory}: transformers.AutoTokenizer could not load its tokenizer "
            f"({type(error).__name__}: {reason})"
        ) from error
    if not getattr(hf, "is_fast", False) or not hasattr(hf, "backend_tokenizer"):
        raise ConfigError(
            f"{key}={directory} loads only as a slow tokenizer ({type(hf).__name__}): save a fast one "
            "(tokenizer.json) with tokenizer.save_pretrained and point data.tokenizer at it"
        )
    eos = hf.eos_token_id if hf.eos_token_id is not None else _fallback_eos(path, hf.backend_tokenizer)
    if eos is None:
        raise ConfigError(f"{key}={directory} names no end-of-text token: set eos_token in its tokenizer_config.json")
    if hf.eos_token_id is None:  # saved with the tokenizer, so export and generation find it
        hf.eos_token = hf.backend_tokenizer.id_to_token(eos)
    return PretrainedTokenizer(hf, eos, checkpoint_model_type(path), extra_stop_ids=generation_eos_ids(path))


def chat_quirks(model_type: str | None) -> ChatQuirks:
    """The chat quirks of model_type's family (trainer.model.families); the defaults (a system turn,
    no end-of-turn tokens beyond eos) for a model_type without a family, or None."""
    from trainer.model.families import ChatQuirks, family  # lazily: the registry imports every family

    if model_type not in MODEL_TYPES:
        return ChatQuirks()
    try:
        return family(model_type).chat
    except ModuleNotFoundError as error:  # a family module not written yet
        if not (error.name or "").startswith("trainer.model.families."):
            raise
        return ChatQuirks()


def checkpoint_model_type(directory: Path) -> str | None:
    """config.json's model_type in a checkpoint directory (a multimodal one's text_config's when
    that is the family: Gemma 3's "gemma3" holds a "gemma3_text"), or None without one."""
    path = Path(directory) / "config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    model_type = config.get("model_type")
    text_type = (config.get("text_config") or {}).get("model_type")
    return text_type if model_type not in MODEL_TYPES and text_type in MODEL_TYPES else model_type


def generation_eos_ids(directory: Path | None) -> list[int]:
    """generation_config.json's eos_token_id in `directory` (one id or a list), [] without one."""
    path = Path(directory) / "generation_config.json" if directory is not None else None
    if path is None or not path.is_file():
        return []
    eos = json.loads(path.read_text()).get("eos_token_id")
    ids = eos if isinstance(eos, list) else [eos]
    return [i for i in ids if isinstance(i, int)]


def stop_ids(
    eos_id: int | None, token_id: Callable[[str], int | None], quirks: ChatQuirks, extra: Iterable[int] = ()
) -> tuple[int, ...]:
    """The ids that end generation, each once: eos, the family's end-of-turn tokens (those in the
    vocabulary: token_id gives None for the others), then `extra`."""
    ids = [eos_id, *(token_id(token) for token in quirks.end_of_turn), *extra]
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _fallback_eos(path: Path, backend: tokenizers.Tokenizer) -> int | None:
    """For a tokenizer that names no eos token: the checkpoint's config.json, else a familiar name."""
    if (path / "config.json").exists():
        eos = json.loads((path / "config.json").read_text()).get("eos_token_id")
        eos = eos[0] if isinstance(eos, list) and eos else eos
        if isinstance(eos, int):
            return eos
    for token in EOS_CANDIDATES:
        if backend.token_to_id(token) is not None:
            return backend.token_to_id(token)
    return None
