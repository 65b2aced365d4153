"""Fine-tuning end to end: a tiny random Hugging Face model (GPT-2, Llama, Qwen2) with its own tokenizer,
saved locally, trained from `model.pretrained` on instruction and chat records, then exported and run in
transformers' `pipeline`.

The references are transformers' own: the loss of the first step (taken before any update, with
every training example in the one global batch, packed and document-masked) equals the loss
transformers' model computes on the same examples one by one with labels masked to the response /
assistant tokens, where the chat mask is the one transformers' `apply_chat_template(...,
return_assistant_tokens_mask=True)` derives from `{% generation %}` tags (our rendering needs none).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (
    CHATML_TEMPLATE,
    EXAMPLES,
    LLAMA3_TEMPLATE,
    QWEN2_TEMPLATE,
    chat_records,
    env,
    instruct_records,
    read_metrics,
    run_cli,
)

from trainer.__main__ import compose_config
from trainer.data import build_data
from trainer.loop import train
from trainer.model.loss import IGNORE_INDEX

# The same templates with transformers' {% generation %} tags around each assistant turn (its content
# and the end-of-turn marker, not the newline the template writes after it), from which transformers
# computes its own assistant-token mask.
TAGGED = {
    "gpt2": CHATML_TEMPLATE.replace(
        "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n",
        "<|im_start|>{{ message['role'] }}\n{% if message['role'] == 'assistant' %}{% generation %}"
        "{{ message['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}{% else %}{{ message['content'] }}<|im_end|>\n"
        "{% endif %}",
    ),
    "llama": LLAMA3_TEMPLATE.replace(
        "{{ message['content'] | trim }}<|eot_id|>",
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}<|eot_id|>"
        "{% endgeneration %}{% else %}{{ message['content'] | trim }}<|eot_id|>{% endif %}",
    ),
}
TAGGED["qwen2"] = QWEN2_TEMPLATE.replace(
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n",
    TAGGED["gpt2"].split("{% for message in messages %}")[1].split("{% endfor %}")[0],
)
COMMON = [
    "logger.wandb=false", "logger.progress_bar=false", "train.sample_tokens=0", "train.seq_len=96",
    "data.val_fraction=0.2", "train.eval_batches=1", "optim.lr=3e-3", "optim.warmup_steps=0",
    "train.log_interval=1", "optim.weight_decay=0",
]  # fmt: skip


def overrides(root: Path, model: str, kind: str) -> list[str]:
    return [*COMMON, f"data={kind}", f"data.path={root / f'{kind}.jsonl'}", f"model.pretrained={root / model}",
            f"data.cache_dir={root / 'cache'}"]  # fmt: skip


def reference_examples(root: Path, model: str, kind: str) -> list[tuple[list[int], list[int]]]:
    """The training examples as (ids, labels) built with transformers' tokenizer alone: instruct =
    prompt (with the tokenizer's own special tokens) + response + eos, labels on response + eos; chat =
    the conversation up to the end of its last assistant turn with transformers' assistant mask from
    the tagged template, plus an eos (counted) unless the turn ended with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(root / model))
    out = []
    if kind == "instruct":
        for record in instruct_records()[: EXAMPLES - 2]:
            prompt = tok(record["prompt"])["input_ids"]
            response = tok(record["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            out.append((prompt + response, [IGNORE_INDEX] * len(prompt) + response))
        return out
    for record in chat_records()[: EXAMPLES - 2]:
        rendered = tok.apply_chat_template(
            record["messages"], chat_template=TAGGED[model], tokenize=True, return_dict=True,
            return_assistant_tokens_mask=True,
        )  # fmt: skip
        ids, mask = list(rendered["input_ids"]), list(rendered["assistant_masks"])
        end = max(i for i, m in enumerate(mask) if m) + 1  # later tokens (a newline) teach nothing
        ids, mask = ids[:end], mask[:end]
        if ids[-1] != tok.eos_token_id:
            ids, mask = ids + [tok.eos_token_id], mask + [1]
        out.append((ids, [i if m else IGNORE_INDEX for i, m in zip(ids, mask, strict=True)]))
    return out


def reference_loss(root: Path, model: str, kind: str) -> tuple[float, int]:
    """Mean token loss over every training example's targets, by transformers' model, and their count."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(root / model), dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for ids, labels in reference_examples(root, model, kind):
            logits = hf(torch.tensor([ids])).logits[0, :-1].double()  # predicts ids[1:]
            targets = torch.tensor(labels[1:])
            kept = targets != IGNORE_INDEX
            total += torch.nn.functional.cross_entropy(logits[kept], targets[kept], reduction="sum").item()
            count += int(kept.sum())
    return total / count, count


@pytest.mark.heavy
@pytest.mark.parametrize("kind", ["instruct", "chat"])
@pytest.mark.parametrize("model", ["gpt2", "llama", "qwen2"])
def test_finetune_counts_exactly_the_response_tokens(finetune_dir: Path, model: str, kind: str) -> None:
    root = finetune_dir
    cfg, _ = compose_config(overrides(root, model, kind))
    rows = len(build_data(cfg.data, cfg.train.seq_len, 0, pretrained=cfg.model.pretrained).train)
    # one global batch holds every training row once, so step 1's loss is over every training example
    cfg, _ = compose_config([*overrides(root, model, kind), f"train.micro_batch_size={rows}", "train.max_steps=4"])
    run_dir = root / f"run-{model}-{kind}"
    train(cfg, run_dir)
    rows = read_metrics(run_dir)
    expected_loss, expected_targets = reference_loss(root, model, kind)
    assert rows[0]["target_tokens"] == expected_targets  # exactly the response / assistant tokens (+ eos)
    assert rows[0]["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]  # the same batch 4 times: it learns it
    assert rows[-1]["throughput/target_tokens_per_s"] < rows[-1]["tokens_per_s"]  # padding and prompts
    assert (run_dir / "tokenizer" / "tokenizer.json").is_file()  # the model's tokenizer, saved with the run
    meta = json.loads((run_dir / "checkpoints" / "step_00000004" / "meta.json").read_text())
    assert meta["parts"]["tokenizer"]["directory"] == "tokenizer"


@pytest.mark.heavy
@pytest.mark.parametrize("model", ["gpt2", "llama"])
def test_export_runs_in_pipeline_with_the_harness_greedy_text(finetune_dir: Path, model: str, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, pipeline

    from trainer.export import find_checkpoint, load_model, main
    from trainer.generate import generate, load_tokenizer

    root = finetune_dir
    run_dir = tmp_path / "run"
    cfg, _ = compose_config([*overrides(root, model, "chat"), "train.max_steps=2", "train.micro_batch_size=2"])
    train(cfg, run_dir)
    out = tmp_path / "export"
    assert main([str(run_dir), "--out", str(out)]) == 0
    tok = AutoTokenizer.from_pretrained(str(root / model))
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"]) == (tok.bos_token_id, tok.eos_token_id)
    # eos first, then the run's other stop ids (the family's end of turn, the checkpoint's generation_config.json)
    stops = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    saved = run_dir / "tokenizer" / "generation_config.json"  # written when there is more than eos
    saved = json.loads(saved.read_text())["eos_token_id"] if saved.is_file() else tok.eos_token_id
    assert (stops if isinstance(stops, list) else [stops])[0] == tok.eos_token_id and stops == saved

    pipe = pipeline("text-generation", model=str(out))  # no tokenizer or any other argument
    prompt = "the quick brown fox"
    theirs = pipe(prompt, max_new_tokens=12, do_sample=False, return_full_text=False)[0]["generated_text"]
    checkpoint = find_checkpoint(run_dir)
    ours_model, _ = load_model(checkpoint)
    tokenizer = load_tokenizer(checkpoint)
    ours_ids = tokenizer.encode(prompt)
    ours_text = generate(ours_model.eval(), tokenizer, prompt, 12, raw=True)
    hf_ids = pipe(prompt, max_new_tokens=12, do_sample=False, return_tensors=True)[0]["generated_token_ids"]
    new_ids = tokenizer.encode(ours_text, add_special_tokens=False)
    assert list(hf_ids[: len(ours_ids)]) == ours_ids
    assert tokenizer.decode(hf_ids[len(ours_ids) :], skip_special_tokens=True) == theirs
    assert tokenizer.decode(new_ids, skip_special_tokens=True) == theirs

    # the command line prints the same continuation
    done = subprocess.run(
        [sys.executable, "-m", "trainer.generate", str(run_dir), "--prompt", prompt, "--max-new-tokens", "12", "--raw"],
        capture_output=True, text=True, env=env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip("\n") == ours_text


def test_pretrained_refuses_a_foreign_tokenizer_and_a_bad_directory(finetune_dir: Path, tmp_path: Path) -> None:
    root = finetune_dir
    run_dir = tmp_path / "run"
    base = [*overrides(root, "gpt2", "instruct"), f"hydra.run.dir={run_dir}"]
    done = run_cli(*base, "data.tokenizer=byte", cwd=tmp_path)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert "byte" in line and "257" in line and "384" in line, line
    assert not run_dir.exists() or not any(run_dir.rglob("*.safetensors"))
    (tmp_path / "empty").mkdir()
    done = run_cli(*COMMON, "data=instruct", f"data.path={root / 'instruct.jsonl'}", f"model.pretrained={tmp_path / 'empty'}",
                   f"hydra.run.dir={run_dir}", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 2 and "has no config.json" in done.stderr, done.stderr


@pytest.mark.heavy
def test_two_ranks_tokenize_once_per_node_and_train_packed_chat(finetune_dir: Path, tmp_path: Path) -> None:
    """torchrun, 2 ranks, ddp: local rank 0 renders and caches the examples while rank 1 waits, then
    opens the cache; the packed, document-masked chat batches train under DDP."""
    from helpers import torchrun

    run_dir = tmp_path / "run"
    cache = f"data.cache_dir={tmp_path / 'cache'}"  # empty: this run builds it
    args = [*overrides(finetune_dir, "llama", "chat"), cache, "parallel=ddp", "train.max_steps=2",
            "train.micro_batch_size=1", f"hydra.run.dir={run_dir}"]  # fmt: skip
    done = torchrun("-m", "trainer", *args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    logs = [(run_dir / "logs" / f"rank{r}.log").read_text() for r in (0, 1)]
    assert "cache built in" in logs[0] and "cache hit" not in logs[0]
    assert "cache hit" in logs[1] and "cache built" not in logs[1]
    assert [row["step"] for row in read_metrics(run_dir)] == [1, 2]


def test_generate_applies_the_chat_template_unless_raw(finetune_dir: Path) -> None:
    from transformers import AutoTokenizer

    from trainer.generate import prompt_ids

    tok = AutoTokenizer.from_pretrained(str(finetune_dir / "llama"))
    turn = [{"role": "user", "content": "hello there"}]
    expected = tok.apply_chat_template(turn, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert prompt_ids(tok, "hello there", raw=False) == list(expected["input_ids"])
    assert prompt_ids(tok, "hello there", raw=True) == tok("hello there")["input_ids"]  # with its BOS
    assert prompt_ids(tok, "hello there", raw=True)[0] == tok.bos_token_id


def test_generate_from_a_byte_level_run(tmp_path: Path) -> None:
    from trainer.data.tokenizer import ByteTokenizer
    from trainer.export import find_checkpoint, load_model
    from trainer.generate import generate

    run_dir = tmp_path / "run"
    cfg, _ = compose_config([
        "logger.wandb=false", "logger.progress_bar=false", "train.sample_tokens=0", "model.n_layer=1", "model.n_embd=32",
        "train.seq_len=16", "train.max_steps=2", "train.eval_batches=1", f"data.cache_dir={tmp_path / 'cache'}",
    ])  # fmt: skip
    train(cfg, run_dir)
    model, _ = load_model(find_checkpoint(run_dir))
    expected = generate(model.eval(), ByteTokenizer(), "def ", 6)
    done = subprocess.run(
        [sys.executable, "-m", "trainer.generate", str(run_dir), "--prompt", "def ", "--max-new-tokens", "6"],
        capture_output=True, text=True, env=env(), timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout[:-1] == expected and len(expected.encode()) <= 6
