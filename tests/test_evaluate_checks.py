"""trainer.evaluate's checks before any model loads (missing local task data, generation that could not
stop), and the byte tokenizer as a transformers tokenizer (ByteTokenizer.hf, to_hf), which makes a byte
run evaluable. Fast: task managers here index only the shipped tasks and tmp_path, never lm_eval's whole
registry, and no model loads."""

from __future__ import annotations

import importlib.util
import random
import shutil
from pathlib import Path

import pytest

from trainer.data.tokenizer import ByteTokenizer, IdentityTokenizer, load_pretrained_tokenizer, to_hf, train_bpe
from trainer.evaluate import SHIPPED_TASKS, EvaluateError

# -- the byte tokenizer as a Hugging Face tokenizer ------------------------------------------------------

TEXTS = [
    "hello world",
    "  two leading spaces, then punctuation . , ; !",
    "héllo wörld, naïve café: ß ø å",  # 2-byte UTF-8
    "日本語のテキスト 中文 한국어",  # 3-byte
    "emoji 🎉🚀 and a family 👩‍👩‍👧 (zero-width joiners)",  # 4-byte
    "line one\nline two\r\n\ttabbed\n\n",
    " <|endoftext|> as text is its bytes, as ByteTokenizer.encode gives it",
    "",
]


def random_texts(n: int, seed: int = 0) -> list[str]:
    """Strings drawn from ASCII controls and printables, Latin-1, CJK and emoji code points."""
    rng = random.Random(seed)
    ranges = [(0, 0x7F), (0x80, 0x2FF), (0x3040, 0x30FF), (0x4E00, 0x4FFF), (0x1F300, 0x1F64F)]
    out = []
    for _ in range(n):
        out.append("".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 40))))
    return out


@pytest.fixture(scope="module")
def byte_hf():
    return ByteTokenizer().hf()


def test_the_hf_byte_tokenizer_gives_the_byte_ids(byte_hf) -> None:
    byte = ByteTokenizer()
    for text in TEXTS + random_texts(300):
        ids = byte_hf.encode(text, add_special_tokens=False)
        assert ids == byte.encode(text) == list(text.encode("utf-8")), text
        assert byte_hf.encode(text) == ids  # it has no special tokens to add either
        assert byte_hf.decode(ids) == text == byte.decode(ids)
    assert byte_hf.encode(bytes(range(128)).decode(), add_special_tokens=False) == list(range(128))
    rng = random.Random(0)
    for _ in range(500):  # any bytes, cut UTF-8 included: the same replacement characters as bytes.decode
        ids = [rng.randint(0, 255) for _ in range(rng.randint(1, 12))]
        assert byte_hf.decode(ids) == byte.decode(ids), ids


def test_the_hf_byte_tokenizer_has_eos_256_and_no_other_special_token(byte_hf) -> None:
    assert (byte_hf.eos_token, byte_hf.eos_token_id, len(byte_hf)) == ("<|endoftext|>", 256, 257)
    assert byte_hf.bos_token_id is None and byte_hf.pad_token_id is None and byte_hf.chat_template is None
    assert byte_hf.decode([104, 105, 256]) == "hi<|endoftext|>"
    assert byte_hf.decode([0xE6, 0x97]) == ByteTokenizer().decode([0xE6, 0x97]) == "\ufffd"  # a cut character


def test_a_saved_and_reloaded_hf_byte_tokenizer_gives_the_same_ids(byte_hf, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    byte_hf.save_pretrained(str(tmp_path))
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    for text in TEXTS + random_texts(50, seed=1):
        assert reloaded.encode(text, add_special_tokens=False) == list(text.encode("utf-8")), text
        assert reloaded.encode(text) == list(text.encode("utf-8")), text
    assert reloaded.eos_token_id == 256 and len(reloaded) == 257
    # and through the harness's own loader, as data.tokenizer=DIR: the same fingerprinted mapping
    assert load_pretrained_tokenizer(str(tmp_path)).encode_batch(["héllo"])[0].tolist() == list("héllo".encode())


def test_to_hf_gives_every_text_tokenizer_as_a_transformers_one(tmp_path: Path) -> None:
    assert to_hf(ByteTokenizer()).encode("é🎉", add_special_tokens=False) == list("é🎉".encode())
    bpe = train_bpe(["the quick brown fox jumps over the lazy dog " * 20, "é🎉 ünïcode"], vocab_size=300)
    hf = to_hf(bpe)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == bpe.encode(text), text
    assert hf.eos_token_id == bpe.eot_id
    byte_hf = to_hf(ByteTokenizer())
    byte_hf.save_pretrained(str(tmp_path))
    pretrained = load_pretrained_tokenizer(str(tmp_path))
    assert to_hf(pretrained) is pretrained.hf and to_hf(pretrained.hf) is pretrained.hf
    with pytest.raises(ValueError, match=r"^synthetic data has no text tokenizer: downstream tasks need data=\.\.\."):
        to_hf(IdentityTokenizer(64))


# -- check_task_data: local task data that is missing ----------------------------------------------------

needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason='pip install -e ".[eval]"')


def manager_of(*include: Path):
    """A TaskManager over the shipped tasks and `include`, without lm_eval's registry (~10 s to index)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(SHIPPED_TASKS), *map(str, include)], include_defaults=False)


def copied_task(directory: Path, name: str = "copied_mc", data: bool = False) -> Path:
    """tiny_mc's YAML and its loader (utils.py) under another task name in `directory`; its jsonl only if `data`."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (SHIPPED_TASKS / "tiny_mc.yaml").read_text().replace("task: tiny_mc", f"task: {name}")
    (directory / f"{name}.yaml").write_text(text.replace("tag: tiny_tasks", "tag: copied_tasks"))
    shutil.copy(SHIPPED_TASKS / "utils.py", directory / "utils.py")
    if data:
        shutil.copy(SHIPPED_TASKS / "tiny_mc.jsonl", directory / "tiny_mc.jsonl")
    return directory


@needs_lm_eval
def test_shipped_tasks_and_their_tag_pass() -> None:
    from trainer.evaluate import check_task_data, task_configs

    manager = manager_of()
    check_task_data(manager, ["tiny_mc", "tiny_rolling", "tiny_gen", "tiny_tasks"])
    assert sorted(name for name, _, _ in task_configs(manager, "tiny_tasks")) == ["tiny_gen", "tiny_mc", "tiny_rolling"]


@needs_lm_eval
def test_a_task_whose_jsonl_is_missing_names_it(tmp_path: Path) -> None:
    from trainer.evaluate import check_task_data

    tasks = copied_task(tmp_path / "tasks")
    missing = tasks / "tiny_mc.jsonl"
    for name in ("copied_mc", "copied_tasks"):  # the task, and the tag that holds it
        with pytest.raises(EvaluateError) as error:
            check_task_data(manager_of(tasks), [name])
        assert str(error.value) == (
            f"task copied_mc ({tasks / 'copied_mc.yaml'}): dataset_kwargs.data_files.test {missing} does not exist: "
            "put it next to utils.py (load_local_json reads data_files from there)"
        )
    shutil.copy(SHIPPED_TASKS / "tiny_mc.jsonl", missing)
    check_task_data(manager_of(tasks), ["copied_mc", "copied_tasks"])


@needs_lm_eval
def test_a_group_member_whose_data_is_missing_is_named(tmp_path: Path) -> None:
    from trainer.evaluate import check_task_data

    tasks = copied_task(tmp_path / "tasks")
    (tasks / "group.yaml").write_text(
        "group: copied_group\ntask:\n  - tiny_mc\n  - task: copied_mc\n    num_fewshot: 1\n"
        "aggregate_metric_list:\n  - metric: acc\n"
    )
    with pytest.raises(EvaluateError, match=r"^task copied_mc \(.*\): dataset_kwargs.data_files.test .*tiny_mc.jsonl"):
        check_task_data(manager_of(tasks), ["copied_group"])
    (tasks / "group.yaml").write_text(  # a group's dataset_kwargs reach its members, as in lm_eval's TaskFactory
        f"group: copied_group\ntask:\n  - copied_mc\ndataset_kwargs:\n  data_files:\n"
        f"    test: {SHIPPED_TASKS / 'tiny_mc.jsonl'}\n"
    )
    check_task_data(manager_of(tasks), ["copied_group"])


@needs_lm_eval
def test_a_missing_custom_dataset_module_is_named(tmp_path: Path) -> None:
    from trainer.evaluate import check_task_data

    tasks = copied_task(tmp_path / "tasks", data=True)
    (tasks / "utils.py").unlink()
    with pytest.raises(EvaluateError, match=r"custom_dataset's module .*utils.py does not exist: put utils.py next to"):
        check_task_data(manager_of(tasks), ["copied_mc"])


@needs_lm_eval
def test_a_datasets_json_builder_reads_relative_paths_from_the_working_directory(tmp_path: Path, monkeypatch) -> None:
    """dataset_path: json without custom_dataset: datasets.load_dataset resolves a relative data_files
    against the current directory (not the YAML's), globs included; data_dir names the base instead."""
    from trainer.evaluate import check_task_data

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    shutil.copy(SHIPPED_TASKS / "tiny_mc.jsonl", tasks / "mc.jsonl")
    body = "output_type: multiple_choice\ndoc_to_text: context\ndoc_to_choice: choices\ndoc_to_target: answer\n"
    (tasks / "a.yaml").write_text(
        f"task: json_relative\ndataset_path: json\ndataset_kwargs:\n  data_files: mc.jsonl\n{body}"
    )
    (tasks / "b.yaml").write_text(
        f"task: json_glob\ndataset_path: json\ndataset_kwargs:\n  data_files: [m*.jsonl]\n{body}"
    )
    (tasks / "c.yaml").write_text(
        f"task: json_data_dir\ndataset_path: json\ndataset_kwargs:\n  data_dir: {tasks}\n  data_files:\n"
        f"    test: [mc.jsonl]\n{body}"
    )
    (tasks / "d.yaml").write_text(f"task: hub_task\ndataset_path: someone/some_dataset\n{body}")
    manager = manager_of(tasks)
    monkeypatch.chdir(tmp_path)
    for name in ("json_relative", "json_glob"):
        with pytest.raises(EvaluateError, match=r"datasets reads a relative path from the current directory"):
            check_task_data(manager, [name])
    check_task_data(manager, ["json_data_dir", "hub_task"])  # a hub dataset downloads: not checked
    monkeypatch.chdir(tasks)
    check_task_data(manager, ["json_relative", "json_glob", "json_data_dir"])


@needs_lm_eval
def test_main_refuses_missing_task_data_in_one_line_before_the_source_is_read(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    import trainer.evaluate as evaluate

    tasks = copied_task(tmp_path / "tasks")
    code = evaluate.main([str(tmp_path / "no_such_run"), "--tasks", "copied_mc", "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith("error: task copied_mc (") and f"{tasks / 'tiny_mc.jsonl'} does not exist" in err[0]


# -- check_generation: a generate_until task needs a way to stop -----------------------------------------


def generate_task(directory: Path, name: str, generation: str) -> Path:
    """tiny_gen (with its data) under another name, its generation_kwargs replaced by `generation` (YAML lines)."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (SHIPPED_TASKS / "tiny_gen.yaml").read_text().replace("task: tiny_gen", f"task: {name}")
    text = text.replace("tag: tiny_tasks\n", "")
    start, end = text.index("generation_kwargs:"), text.index("filter_list:")
    (directory / f"{name}.yaml").write_text(text[:start] + generation + text[end:])
    for file in ("utils.py", "tiny_gen.jsonl"):
        shutil.copy(SHIPPED_TASKS / file, directory / file)
    return directory


@pytest.fixture
def no_eos():
    """The byte tokenizer without its eos token: a transformers tokenizer with eos_token_id None."""
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=ByteTokenizer().hf().backend_tokenizer)
    assert tokenizer.eos_token_id is None
    return tokenizer


@needs_lm_eval
def test_a_generate_task_without_stop_sequences_and_a_tokenizer_without_eos_is_refused(tmp_path, no_eos) -> None:
    from trainer.evaluate import check_generation

    tasks = generate_task(tmp_path / "tasks", "endless_gen", "generation_kwargs:\n  until: []\n  max_gen_toks: 8\n")
    manager = manager_of(tasks)
    with pytest.raises(EvaluateError) as error:
        check_generation(manager, ["tiny_mc", "endless_gen"], no_eos)
    assert str(error.value) == (
        "task endless_gen generates, and the tokenizer has no end-of-sequence token: give the task a stop sequence "
        "(generation_kwargs.until) and the tokenizer an eos_token (tokenizer_config.json), or generation never "
        "stops early"
    )
    check_generation(manager, ["endless_gen", "tiny_tasks"], ByteTokenizer().hf())  # eos stops it
    check_generation(manager, ["tiny_mc", "tiny_rolling"], no_eos)  # nothing generates


@needs_lm_eval
def test_a_generate_task_with_a_tokenizer_without_eos_is_refused_even_with_stop_sequences(tmp_path, no_eos) -> None:
    """lm_eval 0.4.13's HFLM.generate_until decodes eos_token_id (None) as a stop sequence before any
    request and fails with a TypeError, so a stop sequence alone does not make such a run work. A task
    without `until` stops at its fewshot_delimiter (lm_eval's default) and is in the same case."""
    from trainer.evaluate import check_generation, stop_sequences, task_configs

    tasks = generate_task(tmp_path / "tasks", "default_stop_gen", "generation_kwargs:\n  max_gen_toks: 8\n")
    manager = manager_of(tasks)
    configs = {name: cfg for name, cfg, _ in task_configs(manager, "tiny_tasks")}
    configs["default_stop_gen"] = next(task_configs(manager, "default_stop_gen"))[1]
    assert stop_sequences(configs["tiny_gen"]) == ["\n"] and stop_sequences(configs["default_stop_gen"]) == ["\n\n"]
    for name in ("tiny_gen", "tiny_tasks", "default_stop_gen"):
        with pytest.raises(EvaluateError, match=r"has no end-of-sequence token: lm_eval's generate_until decodes"):
            check_generation(manager, [name], no_eos)


@needs_lm_eval
def test_main_refuses_an_endless_generation_before_the_model_loads(tmp_path: Path, capsys, monkeypatch) -> None:
    """The source's tokenizer (no eos) is read, its weights never are: config.json names no model file."""
    import trainer.evaluate as evaluate

    tasks = generate_task(tmp_path / "tasks", "endless_gen", "generation_kwargs:\n  until: []\n")
    source = tmp_path / "hf"
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=ByteTokenizer().hf().backend_tokenizer).save_pretrained(str(source))
    (source / "config.json").write_text('{"model_type": "gpt2"}\n')  # no weights: loading them would fail
    code = evaluate.main([str(source), "--tasks", "endless_gen", "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [
        "error: task endless_gen generates, and the tokenizer has no end-of-sequence token: give the task a stop "
        "sequence (generation_kwargs.until) and the tokenizer an eos_token (tokenizer_config.json), or generation "
        "never stops early"
    ]


@needs_lm_eval
def test_fewshot_as_multiturn_without_a_chat_template_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    import trainer.evaluate as evaluate

    assert evaluate.main([str(tmp_path), "--tasks", "tiny_mc", "--fewshot-as-multiturn"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: --fewshot-as-multiturn needs --apply-chat-template (turns exist only in a chat template)"
    ]
    assert evaluate.fewshot_turns(True, None) is True and evaluate.fewshot_turns("default", False) is False
    assert evaluate.fewshot_turns(False, None) is False
