"""trainer.evaluate: lm_eval's task machinery on the harness's model gives lm_eval's `hf` model's numbers
on the same weights, for each output type (multiple choice, rolling loglikelihood, generate-until),
GPT-2 and Llama layouts, batch sizes 1 and 4; bad input is one line before the model loads."""

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
    a, b = scores(ours), scores(theirs)
    assert a.keys() == b.keys() and len(a) >= 6
    for key, value in b.items():
        if math.isnan(value):
            assert math.isnan(a[key]), key
        else:
            assert a[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


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
