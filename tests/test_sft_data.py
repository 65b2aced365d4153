"""Fine-tuning data: the model's own tokenizer, instruct and chat records rendered into ids and exact
loss masks, packing with positions, truncation, bad records, sources, the example cache, the preview."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import env, save_tiny_tokenizer

from trainer.config import ConfigError, DataConfig
from trainer.data import ExampleSplit, PretrainedTokenizer, build_data
from trainer.data import examples as examples_module
from trainer.data.tokenizer import load_pretrained_tokenizer
from trainer.model.loss import IGNORE_INDEX

REPO = Path(__file__).resolve().parents[1]
STYLES = ("gpt2", "llama3", "qwen2")
END_OF_TURN = {"gpt2": "<|im_end|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}
EOS = {"gpt2": "<|endoftext|>", "llama3": "<|eot_id|>", "qwen2": "<|im_end|>"}
INSTRUCT = [{"prompt": f"What is {i} plus {i}?", "response": f"It is {2 * i}.", "id": i} for i in range(10)]


def conversation(i: int) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": f"Hello, how are you today {i}?"},
        {"role": "assistant", "content": f"I am fine, thank you {i}."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "The capital of France is Paris."},
    ]


CHATS = [{"messages": conversation(i)} for i in range(10)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The three tiny tokenizer styles, each also as a 'checkpoint' (config.json beside it)."""
    root = tmp_path_factory.mktemp("tokenizers")
    for style in STYLES:
        size = save_tiny_tokenizer(root / style, style)
        (root / style / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": size}))
    return {style: str(root / style) for style in STYLES}


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def sft_cfg(tmp_path: Path, path: Path | str, fmt: str, **overrides) -> DataConfig:
    settings = dict(source="files", path=str(path), format=fmt, cache_dir=str(tmp_path / "cache"), val_fraction=0.1)
    return DataConfig(**{**settings, **overrides})


def target_runs(tokenizer, ids: np.ndarray, targets: np.ndarray) -> list[str]:
    """Each maximal run of target tokens, decoded."""
    runs, start = [], None
    for i, flag in enumerate([*targets.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(tokenizer.decode(ids[start:i]))
            start = None
    return runs


# --- the model's tokenizer ------------------------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_pretrained_tokenizer_wraps_the_hf_tokenizer(tokenizers, style, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizers[style], local_files_only=True)
    tok = load_pretrained_tokenizer(tokenizers[style])
    assert isinstance(tok, PretrainedTokenizer)
    assert tok.vocab_size == len(hf) == 384
    assert (tok.bos_id, tok.eos_id, tok.eot_id, tok.pad_id) == (
        hf.bos_token_id, hf.eos_token_id, hf.eos_token_id, hf.pad_token_id,
    )  # fmt: skip
    assert tok.decode([tok.eos_id]) == EOS[style]
    text = "Hello, how are you today?"
    assert tok.encode(text) == hf(text)["input_ids"]  # the tokenizer's own special tokens
    assert tok.encode(text, add_special_tokens=False) == hf(text, add_special_tokens=False)["input_ids"]
    assert (tok.encode(text)[0] == tok.bos_id) == (style == "llama3")  # only Llama 3 adds a BOS
    assert tok.chat_template == hf.chat_template and "{% for message in messages %}" in tok.chat_template
    messages = conversation(0)[:2]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, tokenize=False)
    tok.save(tmp_path / "saved")
    again = load_pretrained_tokenizer(str(tmp_path / "saved"))
    assert again.fingerprint() == tok.fingerprint() and again.chat_template == tok.chat_template
    assert len({load_pretrained_tokenizer(tokenizers[s]).fingerprint() for s in STYLES}) == 3


@pytest.mark.parametrize("style", ["gpt2", "llama3"])
def test_text_documents_get_the_models_bos_and_eos(tokenizers, style, tmp_path):
    docs = ["The quick brown fox jumps over the lazy dog.\n" * 3, "Once upon a time there was a village.\n" * 3]
    for i, doc in enumerate(docs * 4):
        write_jsonl(tmp_path / "corpus" / f"d{i}.jsonl", [{"text": doc}])
    cfg = DataConfig(source="files", path=str(tmp_path / "corpus"), cache_dir=str(tmp_path / "cache"))
    data = build_data(cfg, 8, 0, pretrained=tokenizers[style])  # data.tokenizer null: the model's own
    tok = data.tokenizer
    assert isinstance(tok, PretrainedTokenizer)
    stream = np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val.tokens)])
    expected = np.concatenate([tok.encode(doc) + [tok.eos_id] for doc in docs * 4])
    np.testing.assert_array_equal(stream, expected)
    assert (stream == tok.eos_id).sum() == 8  # one eos after each document
    assert (stream[0] == tok.bos_id) == (style == "llama3")  # Llama 3's BOS starts each document; GPT-2 adds none
    assert (stream == tok.bos_id).sum() == 8  # llama3: the 8 BOS; gpt2: bos is eos


def test_explicit_byte_or_bpe_with_a_pretrained_model_is_refused(tokenizers, tmp_path):
    write_jsonl(tmp_path / "c.jsonl", [{"text": "hello"}])
    for setting, size in (("byte", 257), ("bpe", 4096)):
        cfg = DataConfig(source="files", path=str(tmp_path / "c.jsonl"), tokenizer=setting, cache_dir=str(tmp_path))
        with pytest.raises(
            ConfigError,
            match=rf"^data.tokenizer={setting} \(vocabulary {size}\) is not the tokenizer of "
            rf"model.pretrained=.*gpt2 \(vocab_size 384 in its config.json\): drop data.tokenizer",
        ):
            build_data(cfg, 8, 0, pretrained=tokenizers["gpt2"])


def test_pretrained_without_tokenizer_files_and_slow_tokenizers(tokenizers, tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50}))
    write_jsonl(tmp_path / "c.jsonl", [{"text": "hello there " * 50}])
    cfg = DataConfig(
        source="files", path=str(tmp_path / "c.jsonl"), cache_dir=str(tmp_path / "cache"), val_fraction=0.3
    )
    with pytest.raises(
        ConfigError, match=r"^model.pretrained=.*model holds no tokenizer files .*: pass data.tokenizer=DIR"
    ):
        build_data(cfg, 8, 0, pretrained=str(tmp_path / "model"))
    # data.tokenizer=DIR names another directory: that one is used
    other = build_data(replace(cfg, tokenizer=tokenizers["qwen2"]), 8, 0, pretrained=str(tmp_path / "model"))
    assert other.tokenizer.fingerprint() == load_pretrained_tokenizer(tokenizers["qwen2"]).fingerprint()
    (tmp_path / "slow").mkdir()  # Canine has a Python tokenizer only
    (tmp_path / "slow" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "CanineTokenizer"}))
    with pytest.raises(ConfigError, match=r"^data.tokenizer=.*slow loads only as a slow tokenizer \(CanineTokenizer\)"):
        load_pretrained_tokenizer(str(tmp_path / "slow"))


# --- instruct and chat: exact loss masks -----------------------------------------------------------


@pytest.mark.parametrize("style", STYLES)
def test_instruct_masks(tokenizers, style, tmp_path):
    path = write_jsonl(tmp_path / "instruct.jsonl", INSTRUCT)
    data = build_data(sft_cfg(tmp_path, path, "instruct"), 64, 0, pretrained=tokenizers[style])
    tok = data.tokenizer
    assert data.format == "instruct" and data.examples == 10 and data.train.num_examples == 9
    for i in range(9):
        ids, targets = data.train.example(i)
        prompt = tok.encode(INSTRUCT[i]["prompt"])  # with the tokenizer's BOS handling
        response = tok.encode(INSTRUCT[i]["response"], add_special_tokens=False)
        np.testing.assert_array_equal(ids, prompt + response + [tok.eos_id])
        assert target_runs(tok, ids, targets) == [INSTRUCT[i]["response"] + EOS[style]]
        assert (ids[0] == tok.bos_id) == (style == "llama3")
    # train_on_prompt: every token after the first is a target; chat_template: the prompt is a user turn
    data = build_data(sft_cfg(tmp_path, path, "instruct", train_on_prompt=True), 64, 0, pretrained=tokenizers[style])
    ids, targets = data.train.example(0)
    assert targets.all() and data.target_tokens[0] == sum(len(data.train.example(i)[0]) - 1 for i in range(9))
    data = build_data(sft_cfg(tmp_path, path, "instruct", chat_template=True), 64, 0, pretrained=tokenizers[style])
    ids, targets = data.train.example(1)
    turn = tok.apply_chat_template([{"role": "user", "content": INSTRUCT[1]["prompt"]}], add_generation_prompt=True)
    assert tok.decode(ids) == turn + INSTRUCT[1]["response"] + EOS[style]
    assert target_runs(tok, ids, targets) == [INSTRUCT[1]["response"] + EOS[style]]
    assert (ids[:2] == tok.bos_id).sum() == (1 if style == "llama3" else 0)  # the template's BOS, not doubled


@pytest.mark.parametrize("style", STYLES)
def test_chat_masks(tokenizers, style, tmp_path):
    records = [*CHATS[:9], {"messages": [*conversation(9), {"role": "user", "content": "Thanks!"}]}]
    records[3] = {"messages": [conversation(3)[1], {"role": "tool", "content": "42"}, *conversation(3)[2:3]]}
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    data = build_data(sft_cfg(tmp_path, path, "chat", val_fraction=0.2), 128, 0, pretrained=tokenizers[style])
    tok = data.tokenizer
    eos_after = "" if EOS[style] == END_OF_TURN[style] else EOS[style]  # gpt2's ChatML turns end with <|im_end|>
    for i in range(8):
        ids, targets = data.train.example(i)
        assistant = [m["content"] for m in records[i]["messages"] if m["role"] == "assistant"]
        expected = [a + END_OF_TURN[style] for a in assistant]
        expected[-1] += eos_after
        assert target_runs(tok, ids, targets) == expected
        rendered = tok.apply_chat_template(records[i]["messages"])
        assert rendered.startswith(
            tok.decode(ids[:-1] if eos_after else ids)
        )  # the template's text, cut after the turn
        assert ids[-1] == tok.eos_id and targets[-1]
        assert (ids[:2] == tok.bos_id).sum() == (1 if style == "llama3" else 0)  # one BOS, from the template
    if style == "qwen2":  # Qwen2's template adds its default system turn (not a target) when none is given
        assert tok.decode(data.train.example(3)[0]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    ids, targets = data.val.example(1)  # a user turn after the last assistant turn is cut off
    assert "Thanks!" not in tok.decode(ids) and target_runs(tok, ids, targets)[-1].startswith("The capital")


def test_chat_needs_a_chat_template(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizers["gpt2"], local_files_only=True)
    hf.chat_template = None
    hf.save_pretrained(tmp_path / "plain")
    (tmp_path / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    with pytest.raises(ConfigError, match=r"^data.format=chat needs a tokenizer with a chat template, and this one"):
        build_data(sft_cfg(tmp_path, path, "chat", tokenizer=str(tmp_path / "plain")), 64, 0)
    with pytest.raises(ConfigError, match=r"^data.format=chat renders conversations with a tokenizer's chat template"):
        build_data(sft_cfg(tmp_path, path, "chat"), 64, 0)  # no model: no template to use


def test_template_that_rewrites_earlier_turns_is_refused(tokenizers, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizers["qwen2"], local_files_only=True)
    # Earlier assistant turns rendered without content: a prefix render is not a prefix of the whole
    hf.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] != 'assistant' or loop.last %}"
        "{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}"
    )
    hf.save_pretrained(tmp_path / "rewrites")
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    with pytest.raises(
        ConfigError, match=r"^the tokenizer's chat template renders messages\[:3\] as text that does not"
    ):
        build_data(sft_cfg(tmp_path, path, "chat", tokenizer=str(tmp_path / "rewrites")), 64, 0)


def test_byte_instruct_without_a_model(tmp_path):
    path = write_jsonl(tmp_path / "instruct.jsonl", INSTRUCT)
    data = build_data(sft_cfg(tmp_path, path, "instruct"), 64, 0)  # auto: byte
    ids, targets = data.train.example(0)
    assert bytes(ids[:-1].tolist()).decode() == INSTRUCT[0]["prompt"] + INSTRUCT[0]["response"]
    assert ids[-1] == 256 and targets.tolist() == [False] * 17 + [True] * 8 + [True]
    with pytest.raises(
        ConfigError, match=r"^data.tokenizer=bpe cannot serve data.format=instruct: use data.tokenizer=byte"
    ):
        build_data(sft_cfg(tmp_path, path, "instruct", tokenizer="bpe"), 64, 0)


# --- packing, positions, truncation, padding ------------------------------------------------------


def check_rows(split: ExampleSplit) -> list[int]:
    """Every row of `split` matches its examples laid side by side; returns the examples in row order."""
    x, y, positions = split.get_batch(np.arange(len(split)))
    assert x.shape == y.shape == positions.shape == (len(split), split.seq_len)
    seen = []
    for row in range(len(split)):
        t = 0
        for e in range(split.row_firsts[row], split.row_firsts[row + 1]):
            ids, targets = split.example(e)
            n = min(len(ids), split.seq_len)
            np.testing.assert_array_equal(x[row, t : t + n].numpy(), ids[:n])
            expected_y = np.where(targets[1:n], ids[1:n], IGNORE_INDEX).tolist() + [IGNORE_INDEX]
            assert y[row, t : t + n].tolist() == expected_y  # the example's last token predicts nothing
            assert positions[row, t : t + n].tolist() == list(range(n))
            seen.append(e)
            t += n
        assert (x[row, t:] == split.pad_id).all() and (y[row, t:] == IGNORE_INDEX).all()  # padding: no target
        assert positions[row, t:].tolist() == list(range(split.seq_len - t))  # its own document from 0
    assert int((y != IGNORE_INDEX).sum()) == split.target_tokens
    return seen


@pytest.mark.parametrize("style", ["llama3", "qwen2"])
def test_packing_keeps_each_examples_mask_and_positions(tokenizers, style, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS + [{"messages": conversation(i)[:3]} for i in range(10, 30)])
    packed = build_data(sft_cfg(tmp_path, path, "chat"), 160, 0, pretrained=tokenizers[style])
    assert check_rows(packed.train) == list(range(packed.train.num_examples))  # every example once, in order
    assert check_rows(packed.val) == list(range(packed.val.num_examples))
    assert len(packed.train) < packed.train.num_examples and packed.truncated == 0
    padded = build_data(sft_cfg(tmp_path, path, "chat", packing=False), 160, 0, pretrained=tokenizers[style])
    assert len(padded.train) == padded.train.num_examples == 27 and len(padded.val) == 3
    check_rows(padded.train)
    assert padded.target_tokens == packed.target_tokens and padded.padding > packed.padding
    assert "rows padded" in padded.describe() and "rows packed" in packed.describe()
    unmasked = build_data(sft_cfg(tmp_path, path, "chat", document_mask=False), 160, 0, pretrained=tokenizers[style])
    x, y = unmasked.train.get_batch(np.array([1, 0]))  # no positions without document masking
    np.testing.assert_array_equal(y.numpy(), packed.train.get_batch(np.array([1, 0]))[1].numpy())
    assert unmasked.train.sampler(0).num_samples == len(unmasked.train)


def test_truncation_is_counted_never_dropped(tokenizers, tmp_path):
    long_prompt = {"prompt": "Once upon a time there was a small village near the mountains. " * 3, "response": "Yes."}
    long_response = {"prompt": "Tell me a story.", "response": "The quick brown fox jumps over the lazy dog. " * 3}
    path = write_jsonl(tmp_path / "instruct.jsonl", [long_prompt, long_response, *INSTRUCT[:8]])
    data = build_data(sft_cfg(tmp_path, path, "instruct"), 24, 0, pretrained=tokenizers["llama3"])
    split = data.train
    assert split.num_examples == 9 and data.truncated == split.truncated == 2
    assert split.without_targets == 1  # the long prompt left no room for its response
    assert int(split.lengths[0]) == int(split.lengths[1]) == 24
    check_rows(split)
    x, y, _ = split.get_batch(np.array([0, 1]))
    assert (y[0] == IGNORE_INDEX).all() and (y[1] != IGNORE_INDEX).sum() == int(split.example(1)[1][1:24].sum())
    assert "2 truncated to seq_len 24 (1 left with no target)" in data.describe()


@pytest.mark.parametrize("style", ["gpt2", "pad-is-eos"])
def test_padding_is_never_a_target_and_eos_stays_one(tokenizers, style, tmp_path):
    from transformers import AutoTokenizer

    directory = tokenizers["gpt2"]
    if style == "pad-is-eos":  # a tokenizer whose pad token is its eos
        hf = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        hf.pad_token = hf.eos_token
        hf.save_pretrained(tmp_path / "tok")
        directory = str(tmp_path / "tok")
    path = write_jsonl(tmp_path / "instruct.jsonl", INSTRUCT)
    data = build_data(sft_cfg(tmp_path, path, "instruct"), 40, 0, pretrained=directory)
    tok = data.tokenizer
    assert tok.pad_id == (tok.eos_id if style == "pad-is-eos" else None)
    assert data.train.pad_id != tok.eos_id
    x, y, positions = data.train.get_batch(np.arange(len(data.train)))
    ends = (positions[:, 1:] == 0) | (x[:, 1:] == data.train.pad_id)  # the next token starts another example
    eos_targets = int((y == tok.eos_id).sum())
    assert eos_targets == data.train.num_examples  # every example's eos is learned
    assert (y[:, :-1][ends] == IGNORE_INDEX).all()  # nothing crosses into the next example or the padding
    assert ((x == data.train.pad_id) <= (y == IGNORE_INDEX)).all()
    check_rows(data.train)


# --- bad records -----------------------------------------------------------------------------------


def test_bad_records_fail_with_file_and_line(tokenizers, tmp_path):
    bad = {  # line -> (record, reason)
        3: ('{"messages": broken', r"not valid JSON"),
        4: ({"messages": [{"role": "robot", "content": "beep"}]}, r"message 0 has the unknown role 'robot'"),
        5: ({"messages": conversation(0)[:2]}, r"it has no assistant turn"),
        6: ({"messages": [{"role": "user", "content": 7}, conversation(0)[2]]}, r"message 0 has content of type int"),
        7: ({"messages": "hi"}, r"its messages are a str"),
    }  # fmt: skip
    for line, (record, reason) in bad.items():
        records = [*CHATS[: line - 1], record, *CHATS[line - 1 :]]
        path = write_jsonl(tmp_path / f"bad{line}" / "chat.jsonl", records)
        fix = r": fix the record, or set data.on_bad_record=skip to skip such records$"
        with pytest.raises(ConfigError, match=rf"^{tmp_path}/bad{line}/chat.jsonl line {line}: {reason}.*{fix}"):
            build_data(sft_cfg(tmp_path, path, "chat"), 64, 0, pretrained=tokenizers["qwen2"])
    records = [*CHATS[:2], *[record for record, _ in bad.values()], *CHATS[2:]]
    path = write_jsonl(tmp_path / "all" / "chat.jsonl", records)
    data = build_data(sft_cfg(tmp_path, path, "chat", on_bad_record="skip"), 64, 0, pretrained=tokenizers["qwen2"])
    assert data.skipped == 5 and data.examples == 10
    assert "5 bad records skipped" in data.describe()
    meta = json.loads(next((tmp_path / "cache").glob("files-chat-hf-*/meta.json")).read_text())
    assert meta["records"] == 15 and meta["first_skipped"][0] == f"{path} line 3"


def test_missing_field_and_empty_files(tokenizers, tmp_path):
    path = write_jsonl(tmp_path / "a" / "instruct.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        ConfigError,
        match=r"^data.prompt_field='prompt' is not a field of .*instruct.jsonl line 1: its fields are "
        r"\['answer', 'question'\] \(set data.prompt_field\)$",
    ):
        build_data(sft_cfg(tmp_path, path, "instruct", on_bad_record="skip"), 64, 0)
    fields = sft_cfg(tmp_path, path, "instruct", prompt_field="question", response_field="answer")
    with pytest.raises(ConfigError, match=r"validation split holds none of the 1 examples: add records"):
        build_data(fields, 64, 0)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match=r"^.*b/empty.jsonl is empty: it holds no records"):
        build_data(sft_cfg(tmp_path, tmp_path / "b" / "empty.jsonl", "instruct"), 64, 0)
    path = write_jsonl(tmp_path / "c" / "instruct.jsonl", INSTRUCT[:5])
    with pytest.raises(
        ConfigError, match=r"validation split holds none of the 5 examples: raise data.val_fraction to 0.2"
    ):
        build_data(sft_cfg(tmp_path, path, "instruct"), 64, 0)


# --- sources: one file, a glob, a directory, parquet, save_to_disk --------------------------------


def test_record_sources_agree(tokenizers, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    def ids_of(path: Path | str, fmt: str, **overrides) -> tuple[np.ndarray, str]:
        data = build_data(sft_cfg(tmp_path, path, fmt, **overrides), 128, 0, pretrained=tokenizers["llama3"])
        ids = [data.train.example(i)[0] for i in range(data.train.num_examples)]
        ids += [data.val.example(i)[0] for i in range(data.val.num_examples)]
        return np.concatenate(ids), data.source

    for fmt, records in (("instruct", INSTRUCT), ("chat", CHATS)):
        root = tmp_path / fmt
        expected, _ = ids_of(write_jsonl(root / "one.jsonl", records), fmt)
        write_jsonl(root / "parts" / "part-0.jsonl", records[:4])
        write_jsonl(root / "parts" / "part-1.jsonl", records[4:])
        (root / "parts" / "notes.txt").write_text("not a record file")
        pq.write_table(pa.Table.from_pylist(records), root / "one.parquet")
        (root / "json").mkdir()
        (root / "json" / "all.json").write_text(json.dumps(records, indent=2))
        datasets.Dataset.from_list(records).save_to_disk(str(root / "saved"))
        for path in (root / "parts" / "part-*.jsonl", root / "parts", root / "one.parquet", root / "json"):
            assert np.array_equal(ids_of(path, fmt)[0], expected), path
        ids, source = ids_of(root / "saved", fmt)  # a save_to_disk folder, whatever data.source says
        assert np.array_equal(ids, expected) and source.startswith("hf (")
        ids, source = ids_of(root / "one.parquet", fmt, source="hf")
        assert np.array_equal(ids, expected) and source.startswith("hf (")
        if fmt == "instruct":
            (root / "one.csv").write_text(
                "prompt,response\n" + "".join(f'"{r["prompt"]}",{r["response"]}\n' for r in records)
            )
            assert np.array_equal(ids_of(root / "one.csv", fmt)[0], expected)


def test_bad_records_in_parquet_and_datasets_give_row_numbers(tokenizers, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [dict(r) for r in INSTRUCT]
    records[4]["response"] = None
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    with pytest.raises(
        ConfigError, match=r"a.parquet row 4: its data.response_field='response' is a NoneType, not a string"
    ):
        build_data(sft_cfg(tmp_path, tmp_path / "a.parquet", "instruct"), 64, 0)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"^data.path=.*saved row 4: its data.response_field"):
        build_data(sft_cfg(tmp_path, tmp_path / "saved", "instruct"), 64, 0)
    with pytest.raises(
        ConfigError, match=r"data.prompt_field='question' is not a column of .*: its columns are \['prompt'"
    ):
        build_data(sft_cfg(tmp_path, tmp_path / "saved", "instruct", prompt_field="question"), 64, 0)
    skip = sft_cfg(tmp_path, tmp_path / "a.parquet", "instruct", on_bad_record="skip", val_fraction=0.2)
    data = build_data(skip, 64, 0)
    assert (data.skipped, data.examples) == (1, 9)


def test_text_formats_read_parquet_files_and_globs(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"document number {i}\n" for i in range(12)]
    for part in range(3):
        pq.write_table(pa.table({"text": texts[part * 4 : part * 4 + 4]}), tmp_path / f"part-{part}.parquet")
    expected = np.concatenate([list(t.encode()) + [256] for t in texts])
    for source in ("files", "hf"):
        for path in (tmp_path / "part-*.parquet", tmp_path / "part-0.parquet"):
            cfg = DataConfig(source=source, path=str(path), tokenizer="byte", cache_dir=str(tmp_path / "cache"))
            data = build_data(replace(cfg, val_fraction=0.2), 4, 0)
            stream = np.concatenate([np.asarray(data.train.tokens), np.asarray(data.val.tokens)])
            np.testing.assert_array_equal(stream, expected if "*" in str(path) else expected[: len(expected) // 3])
    with pytest.raises(ConfigError, match=r"^data.path=.*nothing-\*.jsonl matches no file"):
        build_data(DataConfig(source="files", path=str(tmp_path / "nothing-*.jsonl"), cache_dir=str(tmp_path)), 4, 0)


# --- the example cache and the preview ------------------------------------------------------------


def test_second_build_is_a_cache_hit(tokenizers, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    cfg = sft_cfg(tmp_path, path, "chat")
    first = build_data(cfg, 256, 0, pretrained=tokenizers["qwen2"])
    assert "cache built" in first.describe()

    def no_rendering(*args, **kwargs):
        raise AssertionError("a cache hit rendered records")

    monkeypatch.setattr(examples_module, "make_renderer", no_rendering)
    second = build_data(cfg, 32, 0, pretrained=tokenizers["qwen2"])  # another seq_len: rows recomputed, not examples
    assert "cache hit" in second.describe()
    for i in range(first.train.num_examples):
        np.testing.assert_array_equal(second.train.example(i)[0], first.train.example(i)[0])
    assert second.truncated == 9 + 1 and first.truncated == 0
    monkeypatch.undo()
    for changed in (dict(cfg=replace(cfg, train_on_prompt=True)), dict(pretrained=tokenizers["llama3"])):
        data = build_data(changed.get("cfg", cfg), 64, 0, pretrained=changed.get("pretrained", tokenizers["qwen2"]))
        assert "cache built" in data.describe()
    write_jsonl(path, CHATS[::-1])  # the file changed: rendered again
    third = build_data(cfg, 64, 0, pretrained=tokenizers["qwen2"])
    assert "cache built" in third.describe()
    np.testing.assert_array_equal(third.train.example(0)[0], first.val.example(0)[0])


def test_preview_cli(tokenizers, tmp_path):
    path = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    command = [
        sys.executable, "-m", "trainer.data.preview", "data=chat", f"data.path={path}", "--n", "2",
        f"model.pretrained={tokenizers['llama3']}", f"data.cache_dir={tmp_path / 'cache'}", "data.val_fraction=0.1",
        "train.seq_len=96",
    ]  # fmt: skip
    result = subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("--- example") == 2
    assert "⟦I am fine, thank you 0.<|eot_id|>⟧<|start_header_id|>user<|end_header_id|>" in out
    assert "⟦The capital of France is Paris.<|eot_id|>⟧" in out
    assert "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nAnswer briefly.<|eot_id|>" in out
    assert "examples       10 (9 train / 1 val)" in out and "skipped        0 bad records" in out
    assert "rows           10 (9 train / 1 val) of 96 tokens, packed" in out and "padding" in out
    missing = subprocess.run(
        [*command[:4], f"data.path={tmp_path / 'nope.jsonl'}", f"model.pretrained={tokenizers['llama3']}"],
        cwd=REPO, env=env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert missing.returncode == 2 and missing.stdout == ""
    assert (
        missing.stderr.strip()
        == f"error: data.path={tmp_path / 'nope.jsonl'} does not exist: point it at a file, a glob, a directory or a dataset"
    )


def test_data_config_checks():
    with pytest.raises(ConfigError, match=r"^data.format='qa': use text, instruct, chat, preference or prompts$"):
        DataConfig(format="qa")
    with pytest.raises(ConfigError, match=r"^data.format=chat reads records from data.path: use data=chat"):
        DataConfig(format="chat")  # data.source=stdlib
    with pytest.raises(ConfigError, match=r"^data.on_bad_record='ignore': use fail or skip$"):
        DataConfig(source="files", path="x.jsonl", format="chat", on_bad_record="ignore")
