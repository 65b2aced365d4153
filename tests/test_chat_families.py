"""data=chat and generation with the chat templates of the families the harness imports (Qwen3 and
Qwen3-MoE, Gemma 3 and Gemma 2, Phi-3, OLMo 2, Mixtral), each the family's real template
(tests/chat_templates.py) on a tiny local tokenizer with the family's special tokens: the ids
trained on are the template's own rendering, the loss covers exactly each assistant turn and its
end-of-turn token, Qwen3's reasoning is kept where the template keeps it, Gemma refuses a system
message, and generation stops at the end-of-turn token."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_templates import GEMMA2, GEMMA3, MIXTRAL, OLMO2, PHI3, QWEN3
from helpers import TINY_TOKENIZER_TEXT

from trainer.config import ConfigError, DataConfig
from trainer.data import build_data
from trainer.data import tokenizer as tokenizer_module
from trainer.data.tokenizer import PretrainedTokenizer, checkpoint_model_type, load_pretrained_tokenizer
from trainer.model.families import ChatQuirks

QWEN3_TOKENS = dict(
    template=QWEN3,
    special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    added=["<think>", "</think>"],  # Qwen3's are added tokens, not special ones
    tokens=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
)
GEMMA_TOKENS = dict(
    special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
    tokens=dict(bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"),
)
# model_type -> its template and tokenizer: special tokens, other added tokens, bos / eos / pad / unk
FAMILIES = {
    "qwen3": QWEN3_TOKENS,
    "qwen3_moe": QWEN3_TOKENS,
    "gemma3_text": dict(template=GEMMA3, **GEMMA_TOKENS),
    "gemma2": dict(template=GEMMA2, **GEMMA_TOKENS),
    "phi3": dict(
        template=PHI3,
        special=["<unk>", "<s>", "</s>", "<|endoftext|>", "<|assistant|>", "<|end|>", "<|system|>", "<|user|>"],
        tokens=dict(bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>"),
    ),
    "olmo2": dict(
        template=OLMO2,
        special=["<|endoftext|>", "<|pad|>"],  # <|user|> / <|assistant|> are plain text
        tokens=dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", pad_token="<|pad|>"),
    ),
    "mixtral": dict(
        template=MIXTRAL,
        special=["<unk>", "<s>", "</s>"],
        tokens=dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    ),
}
# The quirks each family should have, read off its template: the token that closes an assistant
# turn (Mixtral's and OLMo 2's is eos), no system turn for Gemma (Gemma 2's template raises on one,
# Gemma 3's folds it into the first user turn), reasoning blocks for Qwen3.
QUIRKS = {
    "qwen3": ChatQuirks(end_of_turn=("<|im_end|>",), thinking=True),
    "qwen3_moe": ChatQuirks(end_of_turn=("<|im_end|>",), thinking=True),
    "gemma3_text": ChatQuirks(system_role=False, end_of_turn=("<end_of_turn>",)),
    "gemma2": ChatQuirks(system_role=False, end_of_turn=("<end_of_turn>",)),
    "phi3": ChatQuirks(end_of_turn=("<|end|>",)),
    "olmo2": ChatQuirks(end_of_turn=("<|endoftext|>",)),
    "mixtral": ChatQuirks(end_of_turn=("</s>",)),
}
# Each assistant turn of conversation(i) as the loss sees it: the turn's rendered text, its
# end-of-turn token, and (last turn) the eos that ends the example.
TARGETS = {
    "qwen3": ["fine thanks{i}<|im_end|>", "<think>\n\n</think>\n\nsix it is<|im_end|>"],
    "gemma3_text": ["fine thanks{i}<end_of_turn>", "six it is<end_of_turn><eos>"],
    "gemma2": ["fine thanks{i}<end_of_turn>", "six it is<end_of_turn><eos>"],
    "phi3": ["fine thanks{i}<|end|>", "six it is<|end|>\n<|endoftext|>"],
    "olmo2": ["fine thanks{i}<|endoftext|>", "six it is<|endoftext|>"],
    "mixtral": ["fine thanks{i}</s>", "six it is</s>"],
}
TARGETS["qwen3_moe"] = TARGETS["qwen3"]


def save_family_tokenizer(directory: Path, model_type: str) -> Path:
    """A byte-level BPE with the family's special tokens and chat template, saved with
    save_pretrained, and a config.json naming the model_type."""
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    spec = FAMILIES[model_type]
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=spec["special"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    backend.train_from_iterator([TINY_TOKENIZER_TEXT], trainer=trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=backend, chat_template=spec["template"], **spec["tokens"])
    hf.add_tokens(spec.get("added", []))
    hf.save_pretrained(str(directory))
    (directory / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": len(hf)}))
    return directory


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {model_type: save_family_tokenizer(root / model_type, model_type) for model_type in FAMILIES}


@pytest.fixture
def quirks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The families' quirks as QUIRKS states them, whatever trainer.model.families holds today
    (test_registry_quirks_match_the_templates checks the registry against the templates)."""
    monkeypatch.setattr(tokenizer_module, "chat_quirks", lambda model_type: QUIRKS.get(model_type, ChatQuirks()))


def conversation(i: int) -> list[dict]:
    return [
        {"role": "user", "content": f"hello there {i}"},
        {"role": "assistant", "content": f"fine thanks{i}"},
        {"role": "user", "content": "what is two plus four"},
        {"role": "assistant", "content": "six it is"},
    ]


def chat_data(tmp_path: Path, tokenizer: Path, records: list, **overrides):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    settings = dict(source="files", path=str(path), format="chat", cache_dir=str(tmp_path / "cache"))
    cfg = DataConfig(**{**settings, "val_fraction": 0.2, "tokenizer": str(tokenizer), **overrides})
    return build_data(cfg, 128, 0), path


def target_runs(tok: PretrainedTokenizer, ids: np.ndarray, targets: np.ndarray) -> list[list[int]]:
    """Each maximal run of target tokens."""
    runs, start = [], None
    for i, flag in enumerate([*targets.tolist(), False]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            runs.append(ids[start:i].tolist())
            start = None
    return runs


def template_ids(tok: PretrainedTokenizer, messages: list[dict]) -> list[int]:
    """The template's own rendering of the conversation up to its last assistant turn, tokenized as
    it is, and eos when the template did not end it with one."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    ids = tok.encode(tok.apply_chat_template(messages[: last + 1]).rstrip(), add_special_tokens=False)
    return ids if ids[-1] == tok.eos_id else [*ids, tok.eos_id]


# --- the registry ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_registry_quirks_match_the_templates(family_dirs, model_type):
    from transformers import AutoTokenizer

    from trainer.model.families import family

    try:
        chat = family(model_type).chat
    except (ModuleNotFoundError, ValueError) as error:
        pytest.skip(f"{model_type} is not registered yet ({error})")
    hf = AutoTokenizer.from_pretrained(str(family_dirs[model_type]), local_files_only=True)
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "X"}, {"role": "user", "content": "Y"}]
    text = hf.apply_chat_template(turns, tokenize=False)
    after = text[text.index("X") + 1 :]
    closing = next(token for token in FAMILIES[model_type]["special"] if after.startswith(token))
    assert closing in chat.end_of_turn or (not chat.end_of_turn and closing == hf.eos_token)  # trained, stops
    assert all(token in text for token in chat.end_of_turn)
    assert chat.system_role is QUIRKS[model_type].system_role
    assert chat.thinking is ("reasoning_content" in FAMILIES[model_type]["template"])


def test_chat_quirks_fall_back_and_gemma3_names_its_text_family(tmp_path):
    assert tokenizer_module.chat_quirks(None) == ChatQuirks() == tokenizer_module.chat_quirks("bert")
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gemma3", "text_config": {"model_type": "gemma3_text"}})
    )
    assert checkpoint_model_type(tmp_path) == "gemma3"  # a multimodal Gemma 3 checkpoint: its own family
    assert tokenizer_module.chat_quirks("gemma3") == tokenizer_module.chat_quirks("gemma3_text")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    assert checkpoint_model_type(tmp_path) == "qwen3" and checkpoint_model_type(tmp_path / "none") is None


# --- the loss mask --------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_each_family_trains_on_its_assistant_turns_and_end_of_turn(family_dirs, quirks, model_type, tmp_path):
    records = [{"messages": conversation(i)} for i in range(5)]
    data, _ = chat_data(tmp_path, family_dirs[model_type], records)
    tok = data.tokenizer
    end_of_turn = tok.backend.token_to_id(QUIRKS[model_type].end_of_turn[0])
    for i in range(4):
        ids, targets = data.train.example(i)
        assert ids.tolist() == template_ids(tok, records[i]["messages"])  # the template's own rendering
        runs = target_runs(tok, ids, targets)
        assert [tok.decode(run) for run in runs] == [t.format(i=i) for t in TARGETS[model_type]]
        contents = [m["content"] for m in records[i]["messages"] if m["role"] == "assistant"]
        for run, content in zip(runs, contents, strict=True):
            turn = tok.decode(run[: run.index(end_of_turn)])  # the target after the last content token
            assert turn.endswith(content) and turn.removesuffix(content) in ("", "<think>\n\n</think>\n\n")
        assert targets.sum() == sum(len(run) for run in runs) and ids[-1] == tok.eos_id


def qwen3_records() -> list[dict]:
    think = "<think>\nfour and two make six\n</think>\n\n"
    return [
        # reasoning_content and reasoning inside content: the template drops turn 1's (a user
        # message follows it) and keeps turn 3's
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "fine thanks", "reasoning_content": "greet back"},
            {"role": "user", "content": "what is two plus four"},
            {"role": "assistant", "content": think + "six it is"},
        ],
        # a user message after the last assistant turn is left out, so that turn keeps its reasoning
        [
            {"role": "user", "content": "hello there"},
            {"role": "assistant", "content": "fine thanks", "reasoning_content": "greet back"},
            {"role": "user", "content": "thanks"},
        ],
        # a tool call chain after the last user message: a turn with reasoning keeps it, the last
        # turn gets the template's empty reasoning block
        [
            {"role": "user", "content": "what is two plus four"},
            {"role": "assistant", "content": "let me add", "reasoning_content": "use the tool"},
            {"role": "tool", "content": "6"},
            {"role": "assistant", "content": "six it is"},
        ],
        # ... and one without: the template drops its empty block once more turns follow
        [
            {"role": "user", "content": "what is two plus four"},
            {"role": "assistant", "content": "let me add"},
            {"role": "tool", "content": "6"},
            {"role": "assistant", "content": "six it is", "reasoning_content": "the tool says 6"},
        ],
        [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi"}],
    ]


@pytest.mark.parametrize("model_type", ["qwen3", "qwen3_moe"])
def test_qwen3_reasoning_is_trained_where_the_template_keeps_it(family_dirs, quirks, model_type, tmp_path):
    records = qwen3_records()
    data, _ = chat_data(tmp_path, family_dirs[model_type], [{"messages": m} for m in records])
    tok = data.tokenizer
    expected = [
        ["fine thanks<|im_end|>", "<think>\nfour and two make six\n</think>\n\nsix it is<|im_end|>"],
        ["<think>\ngreet back\n</think>\n\nfine thanks<|im_end|>"],
        ["<think>\nuse the tool\n</think>\n\nlet me add<|im_end|>", "<think>\n\n</think>\n\nsix it is<|im_end|>"],
        ["let me add<|im_end|>", "<think>\nthe tool says 6\n</think>\n\nsix it is<|im_end|>"],
    ]
    for i in range(4):
        ids, targets = data.train.example(i)
        assert ids.tolist() == template_ids(tok, records[i])
        assert [tok.decode(run) for run in target_runs(tok, ids, targets)] == expected[i]
    ids, _ = data.train.example(0)
    assert "greet back" not in tok.decode(ids)  # dropped by the template: neither context nor target
    think = tok.backend.token_to_id("<think>")
    assert ids.tolist().count(think) == 1  # turn 3's block alone


def test_a_template_that_drops_an_earlier_answer_is_refused(family_dirs, quirks, tmp_path):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(family_dirs["qwen3"]), local_files_only=True)
    hf.chat_template = QWEN3.replace(
        "{{- '<|im_start|>' + message.role + '\\n' + content }}\n        {%- endif %}\n        {%- if message.tool_calls",
        "{{- '<|im_start|>' + message.role + '\\n' }}\n        {%- endif %}\n        {%- if message.tool_calls",
    )  # earlier turns lose their answer, not only their reasoning
    assert hf.chat_template != QWEN3
    hf.save_pretrained(tmp_path / "drops")
    (tmp_path / "drops" / "config.json").write_text(json.dumps({"model_type": "qwen3"}))
    with pytest.raises(ConfigError, match=r"^the tokenizer's chat template renders messages\[:2\] as text that does not "
                       r"start the whole conversation, and inside it assistant turn 1 lacks its content"):  # fmt: skip
        chat_data(tmp_path, tmp_path / "drops", [{"messages": conversation(i)} for i in range(5)])


# --- Gemma: no system role ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "template_does"),
    [("gemma3_text", "folds it into the first user turn"), ("gemma2", "refuses it")],
)
def test_gemma_refuses_a_system_message_naming_the_record(family_dirs, quirks, model_type, template_does, tmp_path):
    records = [{"messages": conversation(i)} for i in range(6)]
    records[2]["messages"] = [{"role": "system", "content": "Answer briefly."}, *conversation(2)]
    with pytest.raises(ConfigError) as refused:
        chat_data(tmp_path, family_dirs[model_type], records)
    path = tmp_path / "chat.jsonl"
    assert str(refused.value) == (
        f"{path} line 3: message 0 is a system message, and {model_type} has no system role (its chat template "
        f"{template_does}): fold its text into the first user message, or drop it: fix the record, or set "
        "data.on_bad_record=skip to skip such records"
    )
    data, _ = chat_data(tmp_path, family_dirs[model_type], records, on_bad_record="skip")
    assert data.train.num_examples + data.val.num_examples == 5  # the record is skipped, the others kept


# --- generation stops at the end of a turn --------------------------------------------------------


@pytest.mark.parametrize("model_type", FAMILIES)
def test_stop_ids_are_eos_the_end_of_turn_and_the_checkpoints(family_dirs, quirks, model_type, tmp_path):
    tok = load_pretrained_tokenizer(str(family_dirs[model_type]))
    end_of_turn = tok.backend.token_to_id(QUIRKS[model_type].end_of_turn[0])
    expected = (tok.eos_id,) if end_of_turn == tok.eos_id else (tok.eos_id, end_of_turn)
    assert tok.stop_ids == expected
    checkpoint = tmp_path / "checkpoint"
    tok.hf.save_pretrained(checkpoint)
    (checkpoint / "config.json").write_text(json.dumps({"model_type": model_type}))
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_id, 300, end_of_turn]}))
    with_generation_config = load_pretrained_tokenizer(str(checkpoint))
    assert with_generation_config.stop_ids == (*expected, 300)
    with_generation_config.save(tmp_path / "saved")  # the run's copy keeps them for trainer.generate
    saved = json.loads((tmp_path / "saved" / "generation_config.json").read_text())
    assert saved == {"eos_token_id": [*expected, 300]}
    assert load_pretrained_tokenizer(str(tmp_path / "saved")).stop_ids == (*expected, 300)


class ScriptedModel(torch.nn.Module):
    """Emits `script` one token a step, as GPT.generate does: it stops after the first id of eos_id."""

    def __init__(self, script: list[int]):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.script = script

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None, eos_id=None):
        stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
        out = idx[0].tolist()
        for token in self.script[:max_new_tokens]:
            out.append(token)
            if token in stop:
                break
        return torch.tensor([out])


def test_generate_and_the_closing_sample_stop_at_the_end_of_turn(family_dirs, quirks, monkeypatch, tmp_path):
    from transformers import AutoTokenizer

    import trainer.generate as generate_module
    from trainer.generate import generate, stop_ids_of
    from trainer.loop import sample

    monkeypatch.setattr(generate_module, "chat_quirks", tokenizer_module.chat_quirks)
    tok = load_pretrained_tokenizer(str(family_dirs["gemma3_text"]))
    end_of_turn = tok.backend.token_to_id("<end_of_turn>")
    answer = tok.encode(" six it is", add_special_tokens=False)
    model = ScriptedModel([*answer, end_of_turn, *tok.encode(" and more", add_special_tokens=False), tok.eos_id])

    # the run's closing sample: the prompt, the answer and its end-of-turn token, nothing after
    assert sample(model, tok, "what is", 20, seed=0) == "what is six it is<end_of_turn>"

    # trainer.generate, from a run whose tokenizer directory the checkpoint names
    run = tmp_path / "run"
    tok.save(run / "tokenizer")
    checkpoint = run / "checkpoints" / "step_000001"
    checkpoint.mkdir(parents=True)
    (checkpoint / "meta.json").write_text(json.dumps({"parts": {"tokenizer": {"directory": "tokenizer"}}}))
    hf = AutoTokenizer.from_pretrained(str(run / "tokenizer"), local_files_only=True)
    assert stop_ids_of(checkpoint, hf, "gemma3_text") == (tok.eos_id, end_of_turn)
    assert stop_ids_of(checkpoint, hf, None) == (tok.eos_id, end_of_turn)  # from generation_config.json alone
    assert generate(model, hf, "what is", 20, stop=stop_ids_of(checkpoint, hf, "gemma3_text")) == " six it is"
    assert generate(model, hf, "what is", 20) == " six it is<end_of_turn> and more"  # eos alone: runs on
