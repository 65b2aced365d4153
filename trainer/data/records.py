"""Instruction and chat records -> token ids and a target mask (the tokens that count toward the loss).

    instruct  {prompt, response}: the prompt's ids (with the tokenizer's own BOS handling, or the chat
              template's user turn and generation prompt) + the response's ids + eos. Targets: the
              response and eos (and the prompt with data.train_on_prompt).
    chat      {messages: [{role, content, reasoning_content?}, ...]}: the conversation up to its last
              assistant turn, rendered by the tokenizer's chat template. Targets: each assistant turn as
              the template renders it (a reasoning block it keeps included) and the template's
              end-of-turn token, and an eos that ends the example.

Assistant turns are found without `{% generation %}` tags: rendering messages[:i] with the
generation prompt gives where turn i starts in the whole conversation (that render must be a prefix
of it), and messages[:i+1] where it ends, when that render is a prefix too. A template that renders
a turn differently once later turns follow (Qwen3 drops the reasoning of turns before the last user
message; Phi-3 ends only the whole conversation with eos) has the turn end at the first end-of-turn
token after its start, the family's (ChatQuirks.end_of_turn) or eos, and must still hold its answer
(a template that drops earlier answers is refused). The whole text is tokenized once, with offsets,
and a token is a target when it starts inside an assistant span. The rendered text already holds
the template's BOS, so it is tokenized without adding special tokens. targets[i] says whether token
i is a target, that is, whether the model is trained to predict ids[i] from ids[:i].

A family without a system turn (ChatQuirks.system_role false: Gemma) refuses a conversation with a
system message, rather than train on whatever its template does with one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from trainer.config import ConfigError, DataConfig
from trainer.data.sources import BadRecord
from trainer.data.tokenizer import Tokenizer, chat_quirks

ROLES = ("system", "user", "assistant", "tool")


class MissingField(BadRecord):
    """A record without the field data.<key> names; before any good record, a config error."""

    def __init__(self, key: str, name: str, fields: list[str]):
        super().__init__(f"it has no field data.{key}={name!r} (its fields: {fields})")
        self.key, self.name, self.fields = key, name, fields


@dataclass
class Example:
    """One rendered record: ids and, per token, whether it counts toward the loss."""

    ids: np.ndarray  # (n,) int64
    targets: np.ndarray  # (n,) bool


def make_renderer(cfg: DataConfig, tokenizer: Tokenizer) -> Callable[[Any], Example]:
    """record -> Example for data.format (raising BadRecord for a record that cannot be rendered).
    A tokenizer that lacks what the format needs fails here, in one line."""
    template = getattr(tokenizer, "chat_template", None)
    needs_template = cfg.format == "chat" or cfg.chat_template
    if needs_template and not template:
        what = "data.format=chat" if cfg.format == "chat" else "data.chat_template=true"
        raise ConfigError(
            f"{what} needs a tokenizer with a chat template, and this one ({getattr(tokenizer, 'name', 'custom')}) "
            "has none: set data.tokenizer=DIR to a tokenizer whose tokenizer_config.json or chat_template.jinja "
            "holds one" + ("" if cfg.format == "chat" else ", or data.chat_template=false")
        )
    if cfg.format == "instruct":
        return lambda record: render_instruct(record, tokenizer, cfg)
    if cfg.format == "chat":
        return lambda record: render_chat(record, tokenizer, cfg)
    raise ValueError(f"data.format={cfg.format} has no records")


def field(record: Any, key: str, name: str) -> Any:
    """record[name] (data.<key> = name); BadRecord when the record is not an object holding it."""
    if isinstance(record, BadRecord):
        raise record
    if not isinstance(record, dict):
        raise BadRecord(f"it is a {type(record).__name__}, not an object with a field data.{key}={name!r}")
    if name not in record:
        raise MissingField(key, name, sorted(record))
    return record[name]


def _text(record: Any, key: str, name: str) -> str:
    value = field(record, key, name)
    if not isinstance(value, str):
        raise BadRecord(f"its data.{key}={name!r} is a {type(value).__name__}, not a string")
    return value


def render_instruct(record: Any, tokenizer: Any, cfg: DataConfig) -> Example:
    """prompt ids + response ids + eos; the response and eos are targets (the prompt too with
    data.train_on_prompt)."""
    prompt = _text(record, "prompt_field", cfg.prompt_field)
    response = _text(record, "response_field", cfg.response_field)
    if cfg.chat_template:
        text = _apply(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)
        prompt_ids = tokenizer.encode(text, add_special_tokens=False)  # the template holds its BOS
    else:
        prompt_ids = tokenizer.encode(prompt)  # with the tokenizer's own BOS handling
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    ids = [*prompt_ids, *response_ids, tokenizer.eot_id]
    if len(ids) < 2:
        raise BadRecord("its prompt and response are both empty")
    targets = [cfg.train_on_prompt] * len(prompt_ids) + [True] * (len(response_ids) + 1)
    return Example(np.asarray(ids, dtype=np.int64), np.asarray(targets, dtype=bool))


def check_messages(messages: Any) -> None:
    """BadRecord unless messages is a list of {role, content} with known roles, string contents and
    at least one assistant turn."""
    if not isinstance(messages, list):
        raise BadRecord(f"its messages are a {type(messages).__name__}, not a list of {{role, content}}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise BadRecord(f"message {i} is not an object with a role and content")
        if message["role"] not in ROLES:
            raise BadRecord(f"message {i} has the unknown role {message['role']!r} (roles: {', '.join(ROLES)})")
        if not isinstance(message.get("content"), str):
            raise BadRecord(f"message {i} has content of type {type(message.get('content')).__name__}, not a string")
        if not isinstance(message.get("reasoning_content", ""), str):
            kind = type(message["reasoning_content"]).__name__
            raise BadRecord(f"message {i} has reasoning_content of type {kind}, not a string")
    if not any(m["role"] == "assistant" for m in messages):
        raise BadRecord("it has no assistant turn (nothing to train on)")


def _apply(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except Exception as error:  # the template's own raise_exception, or a Jinja error on this record
        reason = (str(error).strip().splitlines() or [""])[0]
        raise BadRecord(f"the chat template refused it ({type(error).__name__}: {reason})") from error


def check_system_role(tokenizer: Any, messages: list[dict[str, Any]]) -> None:
    """BadRecord for a system message when the family has no system turn, saying what the template
    would do with it and how to fix the record."""
    quirks = getattr(tokenizer, "chat_quirks", None) or chat_quirks(None)
    system = next((i for i, m in enumerate(messages) if m["role"] == "system"), None)
    if quirks.system_role or system is None:
        return
    text = messages[system]["content"]
    try:  # what the template itself does with one, for the message
        rendered = _apply(tokenizer, [messages[system], {"role": "user", "content": "?"}], add_generation_prompt=True)
        done = "folds it into the first user turn" if text.strip() in rendered else "drops it"
    except BadRecord:
        done = "refuses it"
    family = getattr(tokenizer, "model_type", None) or "this model"
    raise BadRecord(
        f"message {system} is a system message, and {family} has no system role (its chat template {done}): "
        "fold its text into the first user message, or drop it"
    )


def assistant_spans(
    tokenizer: Any, messages: list[dict[str, Any]], end_of_turn: tuple[str, ...] = ()
) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span [start, end) of each assistant turn: what
    the template renders after the generation prompt, through its end-of-turn marker (whitespace
    after the marker left out). end_of_turn: the strings that end a turn the template renders
    differently once later turns follow (the tokenizer's eos is tried too)."""
    full = _apply(tokenizer, messages, add_generation_prompt=False)
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    starts = []
    for i in turns:
        before = _apply(tokenizer, messages[:i], add_generation_prompt=True)
        if not full.startswith(before):
            raise _rewrites(f"messages[:{i}] with the generation prompt", i)
        starts.append(len(before))
    markers = [m for m in (*end_of_turn, tokenizer.decode([tokenizer.eot_id])) if m]
    spans = []
    for n, i in enumerate(turns):
        start = starts[n]
        through = _apply(tokenizer, messages[: i + 1], add_generation_prompt=False).rstrip()
        if full.startswith(through):
            spans.append((start, max(len(through), start)))
            continue
        # Inside the conversation the template renders turn i otherwise (without its reasoning, or
        # without the eos that ends a conversation): the turn ends at the first marker after its
        # start, before the next turn starts, and must still hold its answer.
        limit = starts[n + 1] if n + 1 < len(starts) else len(full)
        found = [(at, marker) for marker in markers if (at := full.find(marker, start, limit)) >= 0]
        if not found:
            raise _rewrites(f"messages[:{i + 1}]", i, f"ends at none of its end-of-turn tokens ({', '.join(markers)})")
        at, marker = min(found)
        answer = messages[i]["content"].split("</think>")[-1].strip()
        if answer not in full[start:at]:
            raise _rewrites(f"messages[:{i + 1}]", i, "lacks its content")
        spans.append((start, at + len(marker)))
    return full, spans


def _rewrites(what: str, turn: int, problem: str = "") -> ConfigError:
    inside = f", and inside it assistant turn {turn} {problem}" if problem else ""
    fix = ", or name the family's end-of-turn token (ChatQuirks.end_of_turn)" if "end-of-turn" in problem else ""
    return ConfigError(
        f"the tokenizer's chat template renders {what} as text that does not start the whole conversation{inside} "
        f"(it rewrites earlier turns), so assistant turn {turn} cannot be located: use a template that renders "
        f"conversations prefix by prefix{fix}"
    )


def render_chat(record: Any, tokenizer: Any, cfg: DataConfig) -> Example:
    """The conversation through the chat template, up to the end of its last assistant turn (later
    turns teach nothing, and are left out before rendering: a template that drops the reasoning of
    turns before the last user message keeps the last turn's), then eos unless the template ended
    the turn with it. Targets: the assistant turns and that eos."""
    messages = field(record, "messages_field", cfg.messages_field)
    check_messages(messages)
    check_system_role(tokenizer, messages)
    last = max(i for i, message in enumerate(messages) if message["role"] == "assistant")
    quirks = getattr(tokenizer, "chat_quirks", None) or chat_quirks(None)
    full, spans = assistant_spans(tokenizer, messages[: last + 1], quirks.end_of_turn)
    ids, offsets = tokenizer.encode_with_offsets(full[: spans[-1][1]])
    starts = np.asarray([start for start, _ in offsets], dtype=np.int64)
    targets = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        targets |= (starts >= start) & (starts < end)
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) == 0 or ids[-1] != tokenizer.eot_id:
        ids, targets = np.append(ids, tokenizer.eot_id), np.append(targets, True)
    targets[-1] = True  # the eos that ends the example is always learned
    return Example(ids, targets)
