"""Prompts for sampled fine-tuning (data.format=prompts, for objective=grpo / rloo).

    {prompt: text}        the prompt's user turn through the chat template with the generation prompt,
                          with data.chat_template and a tokenizer that has one; else tokenizer.encode
                          (with the tokenizer's own BOS handling)
    {messages: [...]}     the conversation so far (its last turn not the assistant's), through the chat
                          template with the generation prompt (a tokenizer without one is refused)

Every other field of a record (an answer, test cases) is kept and handed to the reward functions. A
prompt whose ids and the room for a completion (objective.max_new_tokens) exceed train.seq_len is a bad
record: refused naming file and line, or counted and skipped with data.on_bad_record=skip. Prompt sets
are small: they are rendered at each start and kept in memory, not cached. A batch is the prompts'
indices; the objective reads each one with `split.prompt(i)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from trainer.config import ConfigError, DataConfig
from trainer.data.cache import Source
from trainer.data.examples import rendered_records
from trainer.data.records import _apply, _text, check_messages, check_system_role
from trainer.data.sampler import Sampler
from trainer.data.sources import BadRecord
from trainer.data.tokenizer import Tokenizer


@dataclass
class PromptRecord:
    """One prompt: its ids, its text (as rendered by the chat template, or as given) and the record's
    other fields (for the reward functions)."""

    ids: list[int]
    text: str
    fields: dict[str, Any]


def render_prompt(record: Any, tokenizer: Any, cfg: DataConfig) -> PromptRecord:
    """A {prompt} or {messages} record -> PromptRecord (BadRecord for one that cannot be rendered)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(record, dict) and cfg.messages_field in record and cfg.prompt_field not in record:
        used, messages = cfg.messages_field, record[cfg.messages_field]
        if not template:
            raise BadRecord(
                f"its data.messages_field={used!r} holds a conversation, and the tokenizer "
                f"({getattr(tokenizer, 'name', 'custom')}) has no chat template to render it: set data.tokenizer=DIR "
                "to one that has one, or give {prompt: text} records"
            )
        if not isinstance(messages, list) or not messages:
            raise BadRecord(f"its messages are {'empty' if messages == [] else 'not a list of {role, content}'}")
        check_messages([*messages, {"role": "assistant", "content": ""}])  # the answer to come: roles and contents
        if messages[-1]["role"] == "assistant":
            raise BadRecord(
                "its last message is an assistant turn: a prompt ends where the answer starts (drop that turn, "
                "or keep the reference answer in another field for the rewards)"
            )
        check_system_role(tokenizer, messages)
        text = _apply(tokenizer, messages, add_generation_prompt=True)
        ids = tokenizer.encode(text, add_special_tokens=False)  # the template holds its BOS
    else:
        used = cfg.prompt_field
        prompt = _text(record, "prompt_field", cfg.prompt_field)
        if cfg.chat_template and template:
            text = _apply(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            text, ids = prompt, tokenizer.encode(prompt)  # with the tokenizer's own BOS handling
    if not ids:
        raise BadRecord("its prompt is empty")
    return PromptRecord(list(ids), text, {key: value for key, value in record.items() if key != used})


def read_prompts(
    source: Source,
    tokenizer: Tokenizer,
    cfg: DataConfig,
    seq_len: int,
    completion_room: int,
    *,
    show_progress: bool,
) -> tuple[list[PromptRecord], dict[str, Any]]:
    """Every usable prompt of the source, in order, and the tally (records, skipped, first_skipped).
    A prompt longer than seq_len - completion_room is a bad record."""
    tally: dict[str, Any] = {"records": 0, "skipped": 0, "first_skipped": []}

    def render(record: Any) -> PromptRecord:
        prompt = render_prompt(record, tokenizer, cfg)
        n = len(prompt.ids)
        if completion_room and n + completion_room > seq_len:
            raise BadRecord(
                f"its prompt of {n} tokens leaves no room for objective.max_new_tokens={completion_room} within "
                f"train.seq_len={seq_len}: raise train.seq_len, lower objective.max_new_tokens or shorten the prompt"
            )
        if n > seq_len:
            raise BadRecord(
                f"its prompt of {n} tokens is longer than train.seq_len={seq_len}: raise it or shorten the prompt"
            )
        return prompt

    prompts = list(rendered_records(source, render, cfg, tally, show_progress))
    if not prompts:
        fields = f"data.prompt_field={cfg.prompt_field!r} or data.messages_field={cfg.messages_field!r}"
        raise ConfigError(
            f"{source.label} holds no usable prompts ({tally['records']} read, {tally['skipped']} skipped as bad; "
            f"fields read: {fields})"
        )
    return prompts, tally


class PromptSplit:
    """Prompts of one split. A batch is their indices, (B,) int64; `prompt(i)` gives prompt i."""

    all_targets = False
    fields = ("index",)
    target_tokens = 0  # the completions are sampled during training
    padding = 0.0

    def __init__(self, prompts: list[PromptRecord], seq_len: int):
        self.prompts = prompts
        self.seq_len = seq_len
        self.num_tokens = sum(len(p.ids) for p in prompts)

    def __len__(self) -> int:
        """Number of prompts."""
        return len(self.prompts)

    def sampler(self, seed: int) -> Sampler:
        """The order the loop draws this split's prompts in: seeded epochs of shuffled indices."""
        return Sampler(len(self), seed)

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt's ids."""
        return max((len(p.ids) for p in self.prompts), default=0)

    def prompt(self, i: int) -> PromptRecord:
        """Prompt i of this split."""
        return self.prompts[i]

    def get_batch(self, indices: np.ndarray) -> tuple[torch.Tensor]:
        """(indices,) as an int64 tensor, after checking them."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.ndim != 1 or (len(indices) and (indices.min() < 0 or indices.max() >= len(self))):
            raise IndexError(f"prompt indices must be a 1-D array in [0, {len(self)})")
        return (torch.tensor(indices, dtype=torch.int64),)
