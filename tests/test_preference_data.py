"""The data of DPO and GRPO: preference pairs (rows, targets, templates, truncation, bad and identical
pairs, reference log-probs, the cache) and prompts (rendering, kept fields, length refusals)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import save_tiny_tokenizer

from trainer.config import ConfigError, DataConfig
from trainer.data import PreferenceSplit, PromptSplit, build_data
from trainer.data import preference as preference_module
from trainer.data.examples import padding_id
from trainer.data.tokenizer import load_pretrained_tokenizer
from trainer.model.loss import IGNORE_INDEX

STYLES = ("gpt2", "llama3", "qwen2")
EOT = 256  # the byte tokenizer's eos
PAIRS = [{"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.", "rejected": "No idea."} for i in range(10)]


def conversation(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Hello, how are you today {i}?"},
        {"role": "assistant", "content": "I am fine, thank you."},
        {"role": "user", "content": f"What is {i} plus {i}?"},
    ]


def answer(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


MESSAGE_PAIRS = [
    {"chosen": [*conversation(i), answer(f"It is {2 * i}.")], "rejected": [*conversation(i), answer("Paris.")]}
    for i in range(10)
]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tokenizers")
    for style in STYLES:
        save_tiny_tokenizer(root / style, style)
    return {style: str(root / style) for style in STYLES}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def cfg_for(tmp_path: Path, path: Path, fmt: str = "preference", **overrides) -> DataConfig:
    settings = dict(source="files", path=str(path), format=fmt, cache_dir=str(tmp_path / "cache"), val_fraction=0.2)
    return DataConfig(**{**settings, "packing": False, **overrides})


def expected_row(prompt: list[int], completion: list[int], seq_len: int, pad: int) -> tuple[np.ndarray, np.ndarray]:
    """x and y of one row: y[t] = x[t+1] where that token is a completion token, else IGNORE_INDEX."""
    ids = [*prompt, *completion]
    x = np.full(seq_len, pad)
    x[: len(ids)] = ids
    y = np.full(seq_len, IGNORE_INDEX)
    y[len(prompt) - 1 : len(ids) - 1] = completion
    return x, y


# --- preference pairs ------------------------------------------------------------------------------


@pytest.mark.parametrize("style,chat_template", [("gpt2", False), ("llama3", False), ("llama3", True)])
def test_string_pairs_interleave_and_target_the_completions(tokenizers, tmp_path, style, chat_template):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    data = build_data(cfg_for(tmp_path, path, chat_template=chat_template), 48, 0, pretrained=tokenizers[style])
    tok, train = data.tokenizer, data.train
    assert isinstance(train, PreferenceSplit) and data.format == "preference" and data.examples == 10
    assert (len(train), len(data.val), train.fields, train.all_targets) == (8, 2, ("x", "y"), False)
    x, y = train.get_batch(np.array([3, 0]))
    assert x.shape == y.shape == (4, 48) and x.dtype == y.dtype == torch.int64
    pad, targets = padding_id(tok), 0
    for row, (pair, key) in enumerate([(3, "chosen"), (3, "rejected"), (0, "chosen"), (0, "rejected")]):
        record = PAIRS[pair]
        if chat_template:
            text = tok.apply_chat_template([{"role": "user", "content": record["prompt"]}], add_generation_prompt=True)
            prompt = tok.encode(text, add_special_tokens=False)
            assert prompt[0] == tok.bos_id and prompt.count(tok.bos_id) == 1
        else:
            prompt = tok.encode(record["prompt"])  # llama3: with its BOS
        completion = [*tok.encode(record[key], add_special_tokens=False), tok.eot_id]
        np.testing.assert_array_equal(x[row].numpy(), expected_row(prompt, completion, 48, pad)[0])
        np.testing.assert_array_equal(y[row].numpy(), expected_row(prompt, completion, 48, pad)[1])
    for pair in range(8):
        targets += sum(len(tok.encode(PAIRS[pair][k], add_special_tokens=False)) + 1 for k in ("chosen", "rejected"))
    assert train.target_tokens == targets and data.target_tokens[0] == targets
    assert "preference, 10 pairs (8 train / 2 val)" in data.describe() and "20 rows padded" in data.describe()


@pytest.mark.parametrize("style", ["gpt2", "qwen2"])
def test_message_pairs_share_the_templates_prompt(tokenizers, tmp_path, style):
    tok = load_pretrained_tokenizer(tokenizers[style])
    data = build_data(
        cfg_for(tmp_path, write_jsonl(tmp_path / "m.jsonl", MESSAGE_PAIRS)), 96, 0, pretrained=tokenizers[style]
    )
    x, y = data.train.get_batch(np.array([5]))
    prompt = tok.encode(tok.apply_chat_template(conversation(5), add_generation_prompt=True), add_special_tokens=False)
    ends = {"gpt2": "<|im_end|><|endoftext|>", "qwen2": "<|im_end|>"}[style]  # eos added unless the turn ends with it
    for row, text in enumerate(["It is 10.", "Paris."]):
        n = int((y[row] != IGNORE_INDEX).sum())
        assert x[row, : len(prompt)].tolist() == prompt and (y[row, : len(prompt) - 1] == IGNORE_INDEX).all()
        assert tok.decode(y[row, len(prompt) - 1 : len(prompt) - 1 + n].tolist()) == text + ends
        assert (y[row, len(prompt) - 1 + n :] == IGNORE_INDEX).all()
    # TRL's conversational form: the shared messages in prompt, the answers apart: the same rows
    trl = [
        {"prompt": conversation(i), "chosen": [answer(f"It is {2 * i}.")], "rejected": [answer("Paris.")]}
        for i in range(10)
    ]
    other = build_data(cfg_for(tmp_path, write_jsonl(tmp_path / "trl.jsonl", trl)), 96, 0, pretrained=tokenizers[style])
    for a, b in zip(other.train.get_batch(np.array([5])), (x, y), strict=True):
        assert torch.equal(a, b)


def test_a_template_whose_prompt_does_not_start_the_conversation_is_refused(tokenizers, tmp_path):
    tok = load_pretrained_tokenizer(tokenizers["gpt2"])
    # A second BOS with the generation prompt: the prompt's ids are not a prefix of the conversation's.
    tok.hf.chat_template = "{{ bos_token }}{% if add_generation_prompt %}{{ bos_token }}{% endif %}" + tok.chat_template
    tok.hf.save_pretrained(str(tmp_path / "double-bos"))
    path = write_jsonl(tmp_path / "m.jsonl", MESSAGE_PAIRS)
    with pytest.raises(
        ConfigError,
        match=rf"^{path} line 1: the chat template renders its prompt .* do not start its chosen conversation's "
        r"\(from token 1: .*\): .*adds a second BOS; .*: fix the record, or set data.on_bad_record=skip",
    ):
        build_data(cfg_for(tmp_path, path), 96, 0, pretrained=str(tmp_path / "double-bos"))


def test_truncation_keeps_the_start_or_the_end(tmp_path):
    records = [
        {"prompt": "abcdefgh", "chosen": "xyz", "rejected": "uvwxyz"},  # 8 + 4 fits 12; 8 + 7 does not
        {"prompt": "abcdefgh", "chosen": "0123456789ABCDEF", "rejected": "no"},  # 17 completion tokens alone > 12
        *[{"prompt": "p", "chosen": "c", "rejected": f"r{i}"} for i in range(8)],
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    b = lambda text: list(text.encode())  # noqa: E731 (byte ids)
    keep_start = build_data(cfg_for(tmp_path, path, tokenizer="byte"), 12, 0)
    keep_end = build_data(cfg_for(tmp_path, path, tokenizer="byte", truncation="keep_end"), 12, 0)
    x, y = keep_start.train.get_batch(np.array([0, 1]))
    rows = [
        (b("abcdefgh"), [*b("xyz"), EOT]),
        (b("abcdefgh"), b("uvwx")),  # the end cut
        (b("abcdefgh"), b("0123")),
        (b("abcdefgh"), [*b("no"), EOT]),
    ]
    for row, (prompt, completion) in enumerate(rows):
        expected_x, expected_y = expected_row(prompt, completion, 12, 0)
        np.testing.assert_array_equal(x[row].numpy(), expected_x)
        np.testing.assert_array_equal(y[row].numpy(), expected_y)
    x, y = keep_end.train.get_batch(np.array([0, 1]))
    rows = [
        (b("abcdefgh"), [*b("xyz"), EOT]),
        (b("defgh"), [*b("uvwxyz"), EOT]),  # the prompt's start cut
        (b("h"), b("0123456789A")),  # the completion alone too long: cut at its end, one prompt token kept
        (b("abcdefgh"), [*b("no"), EOT]),
    ]
    for row, (prompt, completion) in enumerate(rows):
        expected_x, expected_y = expected_row(prompt, completion, 12, 0)
        np.testing.assert_array_equal(x[row].numpy(), expected_x)
        np.testing.assert_array_equal(y[row].numpy(), expected_y)
    assert keep_start.truncated == keep_end.truncated == keep_start.train.truncated == 2 and keep_end.val.truncated == 0
    assert "2 truncated to seq_len 12" in keep_start.describe()


def test_pairs_cut_away_are_refused_or_skipped(tmp_path):
    records = [*PAIRS[:2], {"prompt": "x" * 24, "chosen": "yes", "rejected": "no"}, *PAIRS[2:]]
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with pytest.raises(
        ConfigError,
        match=rf"^{path} line 3: its prompt of 24 tokens leaves no room for its chosen completion within "
        r"train.seq_len=24 \(data.truncation=keep_start\): raise train.seq_len, set data.truncation=keep_end, or "
        r"shorten the prompt: fix the record, or set data.on_bad_record=skip to skip such records$",
    ):
        build_data(cfg_for(tmp_path, path, tokenizer="byte"), 24, 0)
    data = build_data(cfg_for(tmp_path, path, tokenizer="byte", on_bad_record="skip"), 24, 0)
    assert (data.examples, data.skipped, data.train.skipped) == (10, 1, 1)
    assert "1 bad records skipped" in data.describe()
    x, _ = data.train.get_batch(np.array([2]))  # the pair after the skipped one
    assert bytes(x[0, :24].tolist()).startswith(b"What is 2 pl")
    kept = build_data(cfg_for(tmp_path, path, tokenizer="byte", truncation="keep_end"), 24, 0)
    assert (kept.examples, kept.skipped, kept.truncated) == (11, 0, 11)


def test_identical_pairs_are_counted_and_left_out(tmp_path, caplog):
    same = {"prompt": "Say yes.", "chosen": "yes", "rejected": "yes"}
    same_once_cut = {
        "prompt": "Count up to three.",
        "chosen": "one two three",
        "rejected": "one two four",
    }  # equal in 24 tokens
    path = write_jsonl(tmp_path / "pairs.jsonl", [PAIRS[0], same, *PAIRS[1:5], same_once_cut, *PAIRS[5:]])
    with caplog.at_level(logging.WARNING, logger="trainer"):
        data = build_data(cfg_for(tmp_path, path, tokenizer="byte"), 24, 0)
    assert (data.examples, data.train.identical, data.skipped) == (10, 2, 0)
    (warning,) = [r.getMessage() for r in caplog.records if "identical" in r.getMessage()]
    assert warning.startswith("2 preference pairs have identical chosen and rejected rows") and warning.endswith(
        f"the first: {path} line 2"
    )
    assert "2 with identical rows left out" in data.describe()
    assert build_data(cfg_for(tmp_path, path, tokenizer="byte"), 64, 0).examples == 11  # whole: only one the same


@pytest.mark.parametrize(
    "line,record,error",
    [
        (1, {"prompt": "p", "rejected": "r"}, r"^data.chosen_field='chosen' is not a field of {path} line 1: its "
         r"fields are \['prompt', 'rejected'\] \(set data.chosen_field\)$"),
        (4, {"prompt": "p", "chosen": "c"}, r"^{path} line 4: it has no field data.rejected_field='rejected' \(its "
         r"fields: \['chosen', 'prompt'\]\): fix the record, or set data.on_bad_record=skip to skip such records$"),
        (4, {"chosen": "c", "rejected": "r"}, r"^{path} line 4: it has no field data.prompt_field='prompt'"),
        (4, {"prompt": "p", "chosen": "c", "rejected": [answer("r")]}, r"^{path} line 4: its chosen and rejected "
         r"are a str and a list: give two strings, or two message lists: fix the record"),
    ],
)  # fmt: skip
def test_bad_pairs_fail_in_one_line(tmp_path, line, record, error):
    path = write_jsonl(tmp_path / "pairs.jsonl", [*PAIRS[: line - 1], record, *PAIRS[line - 1 :]])
    with pytest.raises(ConfigError, match=error.format(path=path)):
        build_data(cfg_for(tmp_path, path, tokenizer="byte"), 64, 0)


def test_message_pairs_that_differ_before_their_answer_fail(tokenizers, tmp_path):
    bad = {"chosen": MESSAGE_PAIRS[0]["chosen"], "rejected": [*conversation(1), answer("Paris.")]}
    path = write_jsonl(tmp_path / "m.jsonl", [*MESSAGE_PAIRS[:2], bad])
    with pytest.raises(ConfigError, match=rf"^{path} line 3: its chosen and rejected differ before their last message"):
        build_data(cfg_for(tmp_path, path), 96, 0, pretrained=tokenizers["qwen2"])
    path = write_jsonl(tmp_path / "n.jsonl", MESSAGE_PAIRS)
    with pytest.raises(ConfigError, match=rf"^{path} line 1: its chosen and rejected are message lists, and the "):
        build_data(cfg_for(tmp_path, path, tokenizer="byte"), 96, 0)


def test_reference_log_probs_join_the_batch(tmp_path):
    data = build_data(cfg_for(tmp_path, write_jsonl(tmp_path / "pairs.jsonl", PAIRS), tokenizer="byte"), 64, 0)
    train = data.train
    assert train.directory.is_dir() and train.directory == data.val.directory
    values = np.arange(16, dtype=np.float32) / 4
    train.set_reference(values)
    assert train.fields == ("x", "y", "ref_logps")
    x, y, ref = train.get_batch(np.array([5, 2]))
    assert ref.dtype == torch.float32 and ref.tolist() == [2.5, 2.75, 1.0, 1.25]
    assert x.shape == (4, 64)
    with pytest.raises(ValueError, match=r"must have shape \(16,\), got \(4,\)"):
        train.set_reference(values[:4])
    with pytest.raises(IndexError):
        train.get_batch(np.array([8]))


def test_packed_pairs_share_rows_whole_with_their_own_positions(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    plain = build_data(cfg_for(tmp_path, path, tokenizer="byte"), 64, 0).train
    packed = build_data(cfg_for(tmp_path, path, tokenizer="byte", packing=True), 128, 0).train  # rows of 64 each
    assert packed.fields == ("x", "y", "positions", "sequence") and len(packed) < packed.pairs == plain.pairs == 8
    held = packed.pairs_of(np.arange(len(packed)))
    assert np.concatenate(held).tolist() == list(range(8))  # whole pairs, in order
    x, y, positions, sequence = packed.get_batch(np.arange(len(packed)))
    px, py = plain.get_batch(np.arange(8))
    for b, pairs in enumerate(held):
        t = 0
        for j, pair in enumerate(np.stack([2 * pairs, 2 * pairs + 1], axis=1).reshape(-1).tolist()):
            n = int(plain.rows.lengths[pair])
            assert torch.equal(x[b, t : t + n], px[pair, :n]) and torch.equal(y[b, t : t + n - 1], py[pair, : n - 1])
            assert positions[b, t : t + n].tolist() == list(range(n)) and (sequence[b, t : t + n] == j).all()
            t += n
        assert (sequence[b, t:] == -1).all() and (y[b, t:] == IGNORE_INDEX).all()
    packed.set_reference(np.arange(16, dtype=np.float32))
    *_, ref = packed.get_batch(np.array([0]))
    assert ref[0, : 2 * len(held[0])].tolist() == list(range(2 * len(held[0])))


def test_second_build_is_a_cache_hit(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    first = build_data(cfg_for(tmp_path, path, tokenizer="byte"), 64, 0)
    assert "cache built" in first.describe()

    def no_rendering(*args, **kwargs):
        raise AssertionError("a cache hit rendered records")

    monkeypatch.setattr(preference_module, "_pair_renderer", no_rendering)
    second = build_data(cfg_for(tmp_path, path, tokenizer="byte"), 64, 0)
    assert "cache hit" in second.describe() and second.train.directory == first.train.directory
    for a, b in zip(first.train.get_batch(np.arange(8)), second.train.get_batch(np.arange(8)), strict=True):
        assert torch.equal(a, b)
    monkeypatch.undo()
    for seq_len, overrides in (
        (32, {}),
        (64, {"truncation": "keep_end"}),
        (64, {"chosen_field": "rejected", "rejected_field": "chosen"}),
    ):
        data = build_data(cfg_for(tmp_path, path, tokenizer="byte", **overrides), seq_len, 0)
        assert "cache built" in data.describe()
    x, y = data.train.get_batch(np.array([0]))  # the swapped fields: the rows swap
    assert torch.equal(x, first.train.get_batch(np.array([0]))[0][[1, 0]])


def test_preference_settings_refused(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:3])
    with pytest.raises(ConfigError, match=r"^data.packing=true with data=preference needs data.document_mask=true"):
        build_data(cfg_for(tmp_path, path, tokenizer="byte", packing=True, document_mask=False), 64, 0)
    with pytest.raises(
        ConfigError, match=r"validation split holds none of the 3 pairs: raise data.val_fraction to 0.333"
    ):
        build_data(cfg_for(tmp_path, path, tokenizer="byte"), 64, 0)
    with pytest.raises(ConfigError, match=r"^data.format=preference needs the model's tokenizer"):
        build_data(cfg_for(tmp_path, path), 64, 0)


# --- prompts ---------------------------------------------------------------------------------------


def test_prompts_keep_their_fields(tokenizers, tmp_path):
    records = [{"prompt": f"What is {i} plus {i}?", "answer": str(2 * i), "id": i} for i in range(8)]
    records += [{"messages": conversation(i), "answer": str(2 * i)} for i in (8, 9)]
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    data = build_data(cfg_for(tmp_path, path, "prompts", chat_template=True), 128, 0, pretrained=tokenizers["llama3"])
    tok, train, val = data.tokenizer, data.train, data.val
    assert isinstance(train, PromptSplit) and (len(train), len(val), data.examples) == (8, 2, 10)
    assert (train.fields, train.all_targets, train.target_tokens, train.padding) == (("index",), False, 0, 0.0)
    prompt = train.prompt(3)
    text = tok.apply_chat_template([{"role": "user", "content": "What is 3 plus 3?"}], add_generation_prompt=True)
    assert prompt.text == text and prompt.ids == tok.encode(text, add_special_tokens=False)
    assert prompt.fields == {"answer": "6", "id": 3}
    last = val.prompt(1)
    assert last.text == tok.apply_chat_template(conversation(9), add_generation_prompt=True)
    assert last.ids == tok.encode(last.text, add_special_tokens=False) and last.fields == {"answer": "18"}
    (batch,) = train.get_batch(np.array([4, 1]))
    assert batch.dtype == torch.int64 and batch.tolist() == [4, 1]
    assert val.max_prompt_tokens == len(last.ids) > train.max_prompt_tokens
    assert "prompts, 10 prompts (8 train / 2 val)" in data.describe()


def test_prompts_too_long_are_refused_or_skipped(tmp_path):
    records = [{"prompt": f"p{i}", "answer": i} for i in range(10)]
    records[4] = {"prompt": "x" * 20, "answer": 4}
    path = write_jsonl(tmp_path / "prompts.jsonl", records)
    with pytest.raises(
        ConfigError,
        match=rf"^{path} line 5: its prompt of 20 tokens leaves no room for objective.max_new_tokens=8 within "
        r"train.seq_len=24: raise train.seq_len, lower objective.max_new_tokens or shorten the prompt: fix the record",
    ):
        build_data(cfg_for(tmp_path, path, "prompts", tokenizer="byte"), 24, 0, completion_room=8)
    data = build_data(
        cfg_for(tmp_path, path, "prompts", tokenizer="byte", on_bad_record="skip"), 24, 0, completion_room=8
    )
    assert (data.examples, data.skipped) == (9, 1) and data.train.prompt(4).fields == {"answer": 5}
    assert data.train.prompt(0).ids == list(b"p0") and data.train.prompt(0).text == "p0"
    assert build_data(cfg_for(tmp_path, path, "prompts", tokenizer="byte"), 24, 0).examples == 10  # no room asked
    with pytest.raises(ConfigError, match=rf"^{path} line 5: its prompt of 20 tokens is longer than train.seq_len=16"):
        build_data(cfg_for(tmp_path, path, "prompts", tokenizer="byte"), 16, 0)


def test_bad_prompts_fail_in_one_line(tokenizers, tmp_path):
    ends_with_answer = {"messages": [*conversation(0), answer("0.")]}
    path = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p"}, ends_with_answer])
    with pytest.raises(ConfigError, match=rf"^{path} line 2: its last message is an assistant turn"):
        build_data(cfg_for(tmp_path, path, "prompts"), 64, 0, pretrained=tokenizers["qwen2"])
    path = write_jsonl(tmp_path / "b.jsonl", [{"messages": conversation(0)}])
    with pytest.raises(ConfigError, match=rf"^{path} line 1: its data.messages_field='messages' holds a conversation"):
        build_data(cfg_for(tmp_path, path, "prompts", tokenizer="byte"), 64, 0)
    path = write_jsonl(tmp_path / "c.jsonl", [{"question": "q"}])
    with pytest.raises(ConfigError, match=r"^data.prompt_field='prompt' is not a field of .*c.jsonl line 1"):
        build_data(cfg_for(tmp_path, path, "prompts", tokenizer="byte"), 64, 0)


def test_preview_shows_pairs_and_prompts(tmp_path, capsys):
    from trainer.data.preview import main

    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    base = ["data.tokenizer=byte", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.2", "--n", "1"]
    assert main(["data=preference", f"data.path={pairs}", *base]) == 0
    out = capsys.readouterr().out
    assert "--- pair 0, chosen:" in out and "--- pair 0, rejected:" in out
    assert "What is 0 plus 0?⟦It is 0." in out and "What is 0 plus 0?⟦No idea." in out
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"say {i}", "answer": str(i)} for i in range(10)])
    assert main(["data=prompts", f"data.path={prompts}", *base]) == 0
    out = capsys.readouterr().out
    assert (
        "--- prompt 0: 5 tokens; fields {'answer': '0'}\nsay 0" in out
        and "prompts, 10 prompts (8 train / 2 val)" in out
    )
