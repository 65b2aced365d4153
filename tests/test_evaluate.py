"""trainer.evaluate: lm_eval's task machinery on the harness's model gives lm_eval's `hf` model's numbers
on the same weights, for each output type (multiple choice, rolling loglikelihood, generate-until),
GPT-2 and Llama layouts, batch sizes 1 and 4, with and without a chat template, and for a byte-level
run against its export; bad input is one line before the model loads (more in test_evaluate_checks.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import hf_gpt2, hf_llama, save_tiny_tokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # lm_eval indexes its whole task registry (~10 s) and each case runs two models

TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    out = {}
    for name, style, build in (
        ("gpt2", "gpt2", lambda v: hf_gpt2(vocab_size=v, n_positions=128, n_embd=32, n_head=2)),
        ("llama", "llama3", lambda v: hf_llama(vocab_size=v, hidden_size=32, intermediate_size=48,
                                               max_position_embeddings=128)),
    ):  # fmt: skip
        vocab = save_tiny_tokenizer(root / name, style)
        torch.manual_seed(0)
        build(vocab).save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def byte_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of 10 steps with the byte tokenizer (which saves no tokenizer files), one layer: ~2 s."""
    from helpers import TINY_TOKENIZER_TEXT

    from trainer.__main__ import compose_config
    from trainer.loop import train

    root = tmp_path_factory.mktemp("byte_run")
    (root / "corpus.txt").write_text(TINY_TOKENIZER_TEXT * 20)
    cfg, _ = compose_config([
        "data=files", f"data.path={root / 'corpus.txt'}", "data.tokenizer=byte", f"data.cache_dir={root / 'cache'}",
        "logger.wandb=false", "logger.progress_bar=false", "train.max_steps=10", "train.sample_tokens=0",
        "model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=64", "train.seq_len=64",
        "train.micro_batch_size=4",
    ])  # fmt: skip
    train(cfg, root / "run")
    return root / "run"


def scores(results: dict) -> dict[str, float]:
    """Every numeric metric of every task (stderr included), keyed task/metric."""
    return {f"{task}/{k}": v for task, metrics in results["results"].items() for k, v in metrics.items()
            if isinstance(v, int | float)}  # fmt: skip


@pytest.mark.parametrize("model", ["gpt2", "llama"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_the_harness_model_scores_as_lm_evals_hf_model(checkpoints, model: str, batch_size: int) -> None:
    import lm_eval

    from trainer.evaluate import evaluate, load_source, task_manager

    manager = task_manager([])
    ours = evaluate(*load_source(checkpoints[model])[:2], TASKS, manager, batch_size=batch_size)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoints[model]},dtype=float32", tasks=TASKS, task_manager=manager,
        batch_size=batch_size, device="cpu",
    )  # fmt: skip
    assert_same_scores(scores(ours), scores(theirs))


def assert_same_scores(a: dict[str, float], b: dict[str, float]) -> None:
    """The same metrics, each equal within fp32 noise (NaN where the other is NaN)."""
    assert a.keys() == b.keys() and len(a) >= 6
    for key, value in b.items():
        if math.isnan(value):
            assert math.isnan(a[key]), key
        else:
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_chat_template_scores_as_lm_evals_hf_model(checkpoints, batch_size: int) -> None:
    """apply_chat_template with one few-shot example as turns: the Llama tokenizer's template (it starts with
    {{ bos_token }}, which the tokenizer would add too) gives both models the same prompts, and they score
    them alike, request by request. lm_eval applies no template to rolling loglikelihood (its text is
    the document as it is), so tiny_rolling checks only that the option leaves it alone."""
    import lm_eval

    from trainer.evaluate import evaluate, load_source, task_manager

    manager, options = task_manager([]), dict(batch_size=batch_size, num_fewshot=1, limit=8, log_samples=True)
    model, tokenizer, _ = load_source(checkpoints["llama"])
    ours = evaluate(model, tokenizer, TASKS, manager, apply_chat_template=True, **options)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={checkpoints['llama']},dtype=float32", tasks=TASKS, task_manager=manager,
        device="cpu", apply_chat_template=True, fewshot_as_multiturn=True, **options,
    )  # fmt: skip
    assert_same_scores(scores(ours), scores(theirs))
    mc_prompt = ours["samples"]["tiny_mc"][0]["arguments"][0][0]
    assert mc_prompt.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert mc_prompt.count("<|start_header_id|>assistant") == 2  # the example's answer turn, then the prompt's
    for task in TASKS:
        a, b = ours["samples"][task], theirs["samples"][task]
        assert [s["arguments"] for s in a] == [s["arguments"] for s in b], task
        for x, y in zip(a, b, strict=True):
            assert_same_responses(x["resps"], y["resps"])


def assert_same_responses(a: list, b: list) -> None:
    """One sample's responses: log-likelihoods equal within fp32 noise, generated text and flags exactly."""
    if isinstance(b, list | tuple):
        assert isinstance(a, list | tuple) and len(a) == len(b), (a, b)
        for x, y in zip(a, b, strict=True):
            assert_same_responses(x, y)
    elif isinstance(b, float):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-5)
    else:
        assert a == b


def test_a_byte_level_run_evaluates_and_its_export_scores_alike(byte_run: Path, tmp_path: Path, capsys) -> None:
    """trainer.evaluate takes a byte run's directory (its tokenizer: ByteTokenizer.hf()); the export writes
    that tokenizer beside the weights, and lm_eval's `hf` model on the export gives the run's numbers."""
    import json

    import lm_eval
    from transformers import AutoTokenizer

    from trainer.evaluate import evaluate, load_source, main, task_manager
    from trainer.export import main as export

    out = tmp_path / "scores.json"
    assert main([str(byte_run), "--tasks", "tiny_mc", "--limit", "4", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["n-samples"]["tiny_mc"]["effective"] == 4
    exported = tmp_path / "export"
    assert export([str(byte_run), "--out", str(exported)]) == 0
    assert "(GPT2LMHeadModel) + tokenizer + generation_config.json" in capsys.readouterr().out
    tokenizer = AutoTokenizer.from_pretrained(str(exported), local_files_only=True)
    assert tokenizer.encode(" Paris é🎉\n") == list(" Paris é🎉\n".encode()) and tokenizer.eos_token_id == 256
    assert json.loads((exported / "config.json").read_text())["eos_token_id"] == 256
    manager = task_manager([])
    ours = evaluate(*load_source(byte_run)[:2], TASKS, manager, limit=6, batch_size=4)
    theirs = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={exported},dtype=float32", tasks=TASKS, task_manager=manager, limit=6,
        batch_size=4, device="cpu",
    )  # fmt: skip
    assert_same_scores(scores(ours), scores(theirs))


def test_bad_input_is_one_line_before_the_model_loads(tmp_path: Path, capsys) -> None:
    from trainer.evaluate import main

    assert main([str(tmp_path / "nothing"), "--tasks", "tiny_mc"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {tmp_path / 'nothing'} does not exist: give a run directory, a checkpoint or a Hugging Face directory"
    ]
    assert main([str(tmp_path), "--tasks", "tiny_mcc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown task 'tiny_mcc' (close: tiny_mc" in err[0] and "--include-path" in err[0]


def test_all_checkpoints_scores_every_kept_step(finetune_dir, tmp_path: Path, capsys) -> None:
    """A LoRA run keeping checkpoints at steps 1 and 2: one row per task metric, one column per step; each
    step's scores are that checkpoint's own (its adapters over the base)."""
    import json

    from helpers import lora_run_args, run_cli

    from trainer.evaluate import main

    run = tmp_path / "run"
    args = lora_run_args(finetune_dir, "gpt2", "train.max_steps=2", "checkpoint.interval=1", "checkpoint.keep=4")
    done = run_cli(*args, f"hydra.run.dir={run}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "all.json"
    assert main([str(run), "--all-checkpoints", "--tasks", "tiny_mc", "--limit", "6", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| task | metric | step 1 | step 2 |" in table and "| tiny_mc | acc,none |" in table
    entries = json.loads(out.read_text())
    assert [e["step"] for e in entries] == [1, 2] and all(e["n-samples"]["tiny_mc"]["effective"] == 6 for e in entries)
    single = tmp_path / "one.json"
    assert main([entries[1]["source"], "--tasks", "tiny_mc", "--limit", "6", "--out", str(single)]) == 0
    assert json.loads(single.read_text())["results"] == entries[1]["results"]
