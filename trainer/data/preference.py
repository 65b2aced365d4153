"""Preference pairs (data.format=preference, for objective=dpo): each record becomes two examples of
the example cache (trainer/data/examples.py), prompt + chosen and prompt + rejected, examples 2i and 2i+1.

    strings   {prompt, chosen, rejected}: the prompt's ids (its user turn through the chat template with
              the generation prompt, with data.chat_template and a tokenizer that has one; else
              tokenizer.encode, with the tokenizer's own BOS handling) + the completion's ids + eos.
    messages  {chosen, rejected}: message lists that share every message but their last, an assistant
              turn; or TRL's conversational form, the shared messages in prompt and the answers in chosen
              and rejected. Each conversation is rendered by the chat template; the prompt is the shared
              messages rendered with the generation prompt, and its ids must start each conversation's ids
              (a template that renders earlier turns otherwise once an answer follows, or adds a second
              BOS, is refused). The completion is the rest, ended by eos unless the template ended it so.

Targets are the completion's tokens and that eos; the prompt's are not. Truncation to train.seq_len is
done here (seq_len keys the cache entry): keep_start cuts a row's end (the prompt kept); keep_end cuts
the prompt's start (the completion kept, cut at its own end when it fills seq_len alone: one prompt
token stays, to predict the first completion token from). Chosen and rejected are cut independently. A
pair whose completion is cut away is a bad record (refused, or counted and skipped with
data.on_bad_record=skip); a pair whose two rows are identical teaches nothing (its DPO gradient is
zero) and is left out, counted. A batch of n pairs is 2n padded rows: row 2k is pair k's chosen,
2k+1 its rejected.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig
from trainer.data.cache import Source
from trainer.data.examples import ExampleCache, ExampleSplit, Rendering, open_or_build_examples, pack_rows
from trainer.data.records import Example, _apply, _text, check_messages, check_system_role, field
from trainer.data.sampler import Sampler
from trainer.data.sources import BadRecord
from trainer.data.tokenizer import Tokenizer
from trainer.model.loss import IGNORE_INDEX

SETTINGS = ("format", "prompt_field", "chosen_field", "rejected_field", "chat_template", "truncation")
log = logging.getLogger("trainer")


def check_preference_config(cfg: DataConfig) -> None:
    """Settings preference data cannot honour, refused before any work."""
    if cfg.packing and not cfg.document_mask:
        raise ConfigError(
            "data.packing=true with data=preference needs data.document_mask=true (a pair's log-probs must not "
            "read the other pairs packed into its row): set data.document_mask=true, or data.packing=false"
        )


def row_budget(cfg: DataConfig, seq_len: int) -> int:
    """The tokens each of a pair's rows may hold: seq_len, or with data.packing half of it (a pair's two
    rows share one packed row, whole)."""
    return seq_len // 2 if cfg.packing else seq_len


def budget_name(cfg: DataConfig, budget: int) -> str:
    """The row budget as the user set it, for messages."""
    return f"train.seq_len={2 * budget} // 2 (data.packing)" if cfg.packing else f"train.seq_len={budget}"


def open_or_build_pairs(
    source: Source, tokenizer: Tokenizer, cfg: DataConfig, seq_len: int, cache_root: Path, *, show_progress: bool
) -> ExampleCache:
    """The cache entry of the source's pairs (rendered and truncated to seq_len on a miss); warns once
    (when show_progress) about pairs left out for identical rows."""
    seq_len = row_budget(cfg, seq_len)
    settings = {key: getattr(cfg, key) for key in SETTINGS} | {"seq_len": seq_len, "packing": cfg.packing}
    quirks = getattr(tokenizer, "chat_quirks", None)
    if quirks is not None:  # a family without a system role refuses conversations with one
        settings["chat_quirks"] = dataclasses.asdict(quirks)
    fields = {key: getattr(cfg, key) for key in ("prompt_field", "chosen_field", "rejected_field")}
    rendering = Rendering(settings, fields, lambda tally: _pair_renderer(tally, tokenizer, cfg, seq_len))
    cache = open_or_build_examples(source, tokenizer, cfg, cache_root, show_progress=show_progress, rendering=rendering)
    identical = cache.meta.get("dropped", 0)
    if identical and show_progress:
        log.warning(
            f"{identical:,} preference pairs have identical chosen and rejected rows (the same completion, or the "
            f"same once truncated to {budget_name(cfg, seq_len)}): left out, as their DPO gradient is zero; the first: "
            f"{cache.meta['first_dropped']}"
        )
    return cache


def _pair_renderer(tally: dict[str, Any], tokenizer: Tokenizer, cfg: DataConfig, seq_len: int):
    """record -> [chosen, rejected] Examples cut to seq_len ([] for identical rows); counts pairs,
    truncated pairs (and their indices) and cut-away pairs in tally."""
    tally.update(pairs=0, truncated=0, truncated_pairs=[], cut_away=0)

    def render(record: Any) -> list[Example]:
        prompt, completions = render_pair(record, tokenizer, cfg)
        rows = [fit(prompt, completion, seq_len, cfg.truncation) for completion in completions]
        for name, (example, _) in zip((cfg.chosen_field, cfg.rejected_field), rows, strict=True):
            if not example.targets[1:].any():
                tally["cut_away"] += 1
                raise BadRecord(
                    f"its prompt of {len(prompt)} tokens leaves no room for its {name} completion within "
                    f"{budget_name(cfg, seq_len)} (data.truncation=keep_start): raise train.seq_len, set "
                    "data.truncation=keep_end, or shorten the prompt"
                )
        (chosen, chosen_cut), (rejected, rejected_cut) = rows
        if np.array_equal(chosen.ids, rejected.ids) and np.array_equal(chosen.targets, rejected.targets):
            return []
        if chosen_cut or rejected_cut:
            tally["truncated"] += 1
            tally["truncated_pairs"].append(tally["pairs"])
        tally["pairs"] += 1
        return [chosen, rejected]

    return render


def render_pair(record: Any, tokenizer: Any, cfg: DataConfig) -> tuple[list[int], list[list[int]]]:
    """The prompt's ids and the [chosen, rejected] completions' ids (each ending in eos), untruncated."""
    chosen = field(record, "chosen_field", cfg.chosen_field)
    rejected = field(record, "rejected_field", cfg.rejected_field)
    if isinstance(chosen, list) and isinstance(rejected, list):
        return _conversation_pair(record, chosen, rejected, tokenizer, cfg)
    if not (isinstance(chosen, str) and isinstance(rejected, str)):
        kinds = f"a {type(chosen).__name__} and a {type(rejected).__name__}"
        raise BadRecord(f"its chosen and rejected are {kinds}: give two strings, or two message lists")
    prompt = _text(record, "prompt_field", cfg.prompt_field)
    if cfg.chat_template and getattr(tokenizer, "chat_template", None):
        text = _apply(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)  # the template holds its BOS
    else:
        prompt_ids = tokenizer.encode(prompt)  # with the tokenizer's own BOS handling
    if not prompt_ids:
        raise BadRecord("its prompt is empty (a completion's first token is predicted from the prompt's last)")
    completions = [[*tokenizer.encode(text, add_special_tokens=False), tokenizer.eot_id] for text in (chosen, rejected)]
    return prompt_ids, completions


def _conversation_pair(
    record: dict[str, Any], chosen: list, rejected: list, tokenizer: Any, cfg: DataConfig
) -> tuple[list[int], list[list[int]]]:
    if not getattr(tokenizer, "chat_template", None):
        raise BadRecord(
            f"its chosen and rejected are message lists, and the tokenizer ({getattr(tokenizer, 'name', 'custom')}) "
            "has no chat template to render them: set data.tokenizer=DIR to one that has one, or give string "
            "records {prompt, chosen, rejected}"
        )
    if cfg.prompt_field in record:  # TRL's conversational form: the shared messages apart
        prefix = record[cfg.prompt_field]
        if not isinstance(prefix, list):
            raise BadRecord(
                f"its data.prompt_field={cfg.prompt_field!r} is a {type(prefix).__name__}, not a message list"
            )
        conversations = [prefix + chosen, prefix + rejected]
    else:
        prefix = chosen[:-1]
        if rejected[:-1] != prefix:
            raise BadRecord("its chosen and rejected differ before their last message (a pair shares all but that)")
        conversations = [chosen, rejected]
    for name, conversation in zip((cfg.chosen_field, cfg.rejected_field), conversations, strict=True):
        check_messages(conversation)
        if conversation[-1]["role"] != "assistant":
            raise BadRecord(
                f"its {name} conversation ends with a {conversation[-1]['role']} turn, not an assistant one"
            )
    if not prefix:
        raise BadRecord("its conversations have no message before the answer (the prompt is empty)")
    check_system_role(tokenizer, conversations[0])
    prompt_ids = tokenizer.encode(_apply(tokenizer, prefix, add_generation_prompt=True), add_special_tokens=False)
    completions = []
    for name, conversation in zip((cfg.chosen_field, cfg.rejected_field), conversations, strict=True):
        # Whitespace after the turn's end is left out, as data.format=chat does (records.render_chat).
        text = _apply(tokenizer, conversation, add_generation_prompt=False).rstrip()
        ids = tokenizer.encode(text, add_special_tokens=False)
        if ids[: len(prompt_ids)] != prompt_ids:
            at = next(i for i, token in enumerate(prompt_ids) if i >= len(ids) or ids[i] != token)
            raise BadRecord(
                f"the chat template renders its prompt (the shared messages with the generation prompt, "
                f"{len(prompt_ids)} tokens) as tokens that do not start its {name} conversation's (from token {at}: "
                f"{tokenizer.decode(prompt_ids[at : at + 4])!r} against {tokenizer.decode(ids[at : at + 4])!r}): "
                "the template renders earlier turns otherwise once an answer follows, or adds a second BOS; use a "
                "template that renders conversations prefix by prefix, or string records {prompt, chosen, rejected}"
            )
        completion = ids[len(prompt_ids) :]
        completions.append(completion if completion[-1:] == [tokenizer.eot_id] else [*completion, tokenizer.eot_id])
    return prompt_ids, completions


def fit(prompt: list[int], completion: list[int], seq_len: int, truncation: str) -> tuple[Example, bool]:
    """prompt + completion cut to seq_len tokens as data.truncation says, and whether it was cut.
    Targets: the completion's tokens."""
    cut = len(prompt) + len(completion) > seq_len
    if cut and truncation == "keep_end":
        completion = completion[: seq_len - 1]  # one prompt token stays: the first target is predicted from it
        prompt = prompt[len(prompt) - (seq_len - len(completion)) :]
    ids = [*prompt, *completion][:seq_len]
    targets = ([False] * len(prompt) + [True] * len(completion))[:seq_len]
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool)), cut


class PreferenceSplit:
    """Pairs [first, last) of a preference cache. A batch of n pairs is (x, y), int64 (2n, seq_len)
    (row 2k: pair indices[k]'s chosen, 2k+1: its rejected; y[t] is x[t+1] where that token is a
    completion target, else IGNORE_INDEX), and after set_reference a third tensor, (2n,) float32: the
    rows' reference log-probs.

    packing=True (data.packing): whole pairs (chosen then rejected, each at most seq_len // 2 tokens)
    packed in order into rows of seq_len, and the split's units are those rows. A batch of n rows is
    (x, y, positions, sequence), (n, seq_len): positions count each sequence from 0 (the document mask
    keeps every sequence to itself), sequence is 2j / 2j + 1 on the tokens of the row's j-th pair's
    chosen / rejected and -1 on padding; after set_reference, ref_logps (n, S) holds each sequence's
    reference log-prob at its sequence index (S = 2 x the most pairs a row of the batch holds)."""

    all_targets = False  # prompt and padding targets are IGNORE_INDEX

    def __init__(self, cache: ExampleCache, first: int, last: int, seq_len: int, *, pad_id: int, packing: bool = False):
        # Examples were cut (to seq_len, or seq_len // 2 packed) when rendered: the rows are them, padded.
        self.packing = self.document_mask = packing
        width = seq_len // 2 if packing else seq_len
        self.rows = ExampleSplit(cache, 2 * first, 2 * last, width, packing=False, document_mask=False, pad_id=pad_id)
        self.pad_id = pad_id
        self.pairs = last - first
        lengths = self.rows.lengths[0::2] + self.rows.lengths[1::2]  # (pairs,) both rows of each pair
        self.row_firsts = pack_rows(lengths, seq_len) if packing else np.arange(self.pairs + 1)
        self.seq_len = seq_len
        self.directory = cache.directory  # the cache entry: reference log-probs may be kept there
        self.target_tokens = self.rows.target_tokens  # completion tokens of both rows of every pair
        self.num_tokens = self.rows.num_tokens
        truncated = np.asarray(cache.meta["truncated_pairs"], dtype=np.int64)
        self.truncated = int(((truncated >= first) & (truncated < last)).sum())  # pairs of this split cut
        self.skipped = cache.meta["cut_away"]  # pairs of the whole source skipped as cut away by truncation
        self.identical = cache.meta.get("dropped", 0)  # pairs of the whole source left out for identical rows
        self.fields: tuple[str, ...] = ("x", "y", "positions", "sequence") if packing else ("x", "y")
        self.reference: np.ndarray | None = None  # (2 * pairs,) float32

    def __len__(self) -> int:
        """Number of units a batch draws from: pairs (rows when packed)."""
        return len(self.row_firsts) - 1

    def pairs_of(self, units: np.ndarray) -> list[np.ndarray]:
        """The pair indices each unit holds, in order (a pair alone, unpacked)."""
        return [np.arange(self.row_firsts[u], self.row_firsts[u + 1]) for u in np.asarray(units).tolist()]

    def sampler(self, seed: int) -> Sampler:
        """The order the loop draws this split's pairs in: seeded epochs of shuffled indices."""
        return Sampler(len(self), seed)

    @property
    def padding(self) -> float:
        """Share of the rows' positions that are padding."""
        if not self.packing:
            return self.rows.padding
        return 1 - float(self.rows.lengths.sum()) / max(len(self) * self.seq_len, 1)

    def set_reference(self, values: np.ndarray) -> None:
        """The reference model's log-prob of each row's completion, (2 * pairs,) float32 in row order
        (pair i's chosen at 2i, its rejected at 2i+1); batches carry them from now on."""
        values = np.asarray(values)
        if values.shape != (2 * self.pairs,):
            raise ValueError(f"reference log-probs must have shape ({2 * self.pairs},), got {values.shape}")
        self.reference = values.astype(np.float32)
        self.fields = (*self.fields[: 4 if self.packing else 2], "ref_logps")

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Pairs `indices` as (x, y) int64 (2n, seq_len), and ref_logps (2n,) float32 after set_reference."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"pair indices must be a 1-D array in [0, {len(self)})")
        if self.packing:
            return self._packed_batch(indices)
        rows = np.stack([2 * indices, 2 * indices + 1], axis=1).reshape(-1)  # (2n,) chosen, rejected, ...
        x, y = self.rows.get_batch(rows)
        if self.reference is None:
            return x, y
        return x, y, torch.from_numpy(self.reference[rows])

    def _packed_batch(self, units: np.ndarray) -> tuple[torch.Tensor, ...]:
        """Packed rows `units`: (x, y, positions, sequence) and ref_logps (see the class docstring)."""
        shape = (len(units), self.seq_len)
        x, y = np.full(shape, self.pad_id, dtype=np.int64), np.full(shape, IGNORE_INDEX, dtype=np.int64)
        positions, sequence = np.zeros(shape, dtype=np.int64), np.full(shape, -1, dtype=np.int64)
        held = self.pairs_of(units)
        S = 2 * max((len(pairs) for pairs in held), default=1)
        reference = np.zeros((len(units), S), dtype=np.float32)
        for b, pairs in enumerate(held):
            t = 0
            for j, rows in enumerate(np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1).tolist()):
                ids, targets = self.rows.example(rows)
                n = int(self.rows.lengths[rows])
                ids, targets = ids[:n], targets[:n]
                x[b, t : t + n] = ids
                y[b, t : t + n - 1] = np.where(targets[1:], ids[1:], IGNORE_INDEX)
                positions[b, t : t + n] = np.arange(n)
                sequence[b, t : t + n] = j
                if self.reference is not None:
                    reference[b, j] = self.reference[rows]
                t += n
            positions[b, t:] = np.arange(self.seq_len - t)  # the padding run: one more document
        batch = tuple(torch.from_numpy(a) for a in (x, y, positions, sequence))
        return (*batch, torch.from_numpy(reference)) if self.reference is not None else batch
