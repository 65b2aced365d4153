"""In-loop downstream evaluation (eval.*, trainer/evaluation/inloop.py).

One fine-tuning run with eval.tasks (lm_eval's three output types, the shipped tiny tasks) and
eval.files, evaluated at steps 2 and 4 with a checkpoint at each:
- the eval/<task>/<metric> rows equal `python -m trainer.evaluate --all-checkpoints` on the run's own
  checkpoints (that command equals lm_eval's `hf` model: tests/test_evaluate.py), step by step;
- eval/ppl/<file> equals the perplexity transformers' model of the export gives the same windows;
- training is untouched: the same run without eval.* logs the same losses and ends on the same
  weights, bit for bit (the evaluation runs on forked random state, and gives the model back in
  training mode).
Every strategy's rows equal one process's: the `eval` row of the feature x strategy matrix
(tests/matrix.py; zero3 in the default suite, every strategy under -m matrix).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import env, read_metrics, run_cli
from safetensors.torch import load_file

from trainer.config import ConfigError
from trainer.config.load import compose_config
from trainer.evaluation.inloop import logged_metrics, metric_key
from trainer.preflight import check_run

pytest.importorskip("lm_eval")

TASKS = "eval.tasks=[tiny_mc,tiny_gen,tiny_rolling]"
SEQ_LEN = 48


def run_args(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        "logger.wandb=false", "logger.progress_bar=false", "train.sample_tokens=0", f"train.seq_len={SEQ_LEN}",
        "data=instruct", "data.packing=false", "data.val_fraction=0.2", f"data.path={root / 'instruct.jsonl'}",
        f"model.pretrained={root / 'llama'}", f"data.cache_dir={root / 'cache'}", "train.micro_batch_size=2",
        "train.max_steps=4", "train.log_interval=1", "train.eval_interval=4", "train.eval_batches=2",
        "optim.lr=3e-3", "optim.warmup_steps=0", "checkpoint.interval=2", "checkpoint.keep=4",
        f"hydra.run.dir={out}", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(finetune_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the run with eval.*, the same run without)."""
    root = tmp_path_factory.mktemp("inloop")
    with_eval, without = root / "with_eval", root / "without"
    evaluated = run_cli(
        *run_args(
            finetune_dir,
            with_eval,
            TASKS,
            "eval.limit=8",
            "eval.interval=2",
            "eval.batch_size=3",
            f"eval.files=[{finetune_dir / 'chat.jsonl'}]",
        ),  # fmt: skip
        cwd=root,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    plain = run_cli(*run_args(finetune_dir, without), cwd=root)
    assert plain.returncode == 0, plain.stderr[-3000:]
    return with_eval, without


def eval_rows(run: Path) -> dict[int, dict]:
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("eval/")}
        for r in read_metrics(run)
        if "eval/time_s" in r
    }


@pytest.mark.slow  # the module's two training runs (~50 s); the matrix's eval row runs in the default suite
def test_rows_equal_trainer_evaluate_on_each_checkpoint(runs: tuple[Path, Path], tmp_path: Path) -> None:
    run, _ = runs
    rows = eval_rows(run)
    assert sorted(rows) == [2, 4]
    out = tmp_path / "all.json"
    command = [sys.executable, "-m", "trainer.evaluate", str(run), "--all-checkpoints", "--tasks",
               "tiny_mc,tiny_gen,tiny_rolling", "--limit", "8", "--batch-size", "3", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    scored = {entry["step"]: logged_metrics(entry) for entry in json.loads(out.read_text())}
    assert sorted(scored) == [2, 4]
    for step in (2, 4):
        logged = {k: v for k, v in rows[step].items() if not k.startswith(("eval/ppl/", "eval/time_s"))}
        assert set(logged) == set(scored[step]), sorted(set(logged) ^ set(scored[step]))
        assert "eval/tiny_mc/acc" in logged and "eval/tiny_gen/exact_match_strip" in logged
        for key, want in scored[step].items():
            assert logged[key] == pytest.approx(want, rel=1e-6, abs=1e-9), (step, key, logged[key], want)
    # the run learns between the two evaluations: the rolling perplexity moves
    assert rows[4]["eval/tiny_rolling/byte_perplexity"] != rows[2]["eval/tiny_rolling/byte_perplexity"]


@pytest.mark.slow  # the module's two training runs (~50 s); the matrix's eval row runs in the default suite
def test_file_perplexity_equals_transformers_on_the_export(runs: tuple[Path, Path], finetune_dir: Path,
                                                          tmp_path: Path) -> None:  # fmt: skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, _ = runs
    export = tmp_path / "export"
    done = subprocess.run([sys.executable, "-m", "trainer.export", str(run), "--out", str(export)], env=env(),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    model = AutoModelForCausalLM.from_pretrained(str(export), torch_dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(str(export))((finetune_dir / "chat.jsonl").read_text())["input_ids"]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, SEQ_LEN):
        window = torch.tensor([ids[start : start + SEQ_LEN + 1]])
        with torch.no_grad():
            logits = model(window[:, :-1]).logits
        total += torch.nn.functional.cross_entropy(logits[0].double(), window[0, 1:], reduction="sum").item()
        count += window.size(1) - 1
    want = math.exp(total / count)
    got = eval_rows(run)[4]["eval/ppl/chat"]
    assert got == pytest.approx(want, rel=1e-5), (got, want)


@pytest.mark.slow  # the module's two training runs (~50 s); the matrix's eval row runs in the default suite
def test_training_is_untouched(runs: tuple[Path, Path]) -> None:
    with_eval, without = runs
    a, b = read_metrics(with_eval), read_metrics(without)
    assert [(r["step"], r["loss"], r["grad_norm"]) for r in a] == [(r["step"], r["loss"], r["grad_norm"]) for r in b]
    assert [r.get("val_loss") for r in a] == [r.get("val_loss") for r in b]
    wa = load_file(str(with_eval / "checkpoints" / "final" / "model.safetensors"))
    wb = load_file(str(without / "checkpoints" / "final" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not any(k.startswith("eval/") for r in b for k in r)


@pytest.mark.slow  # the module's two training runs (~50 s); the matrix's eval row runs in the default suite
def test_console_line_and_time(runs: tuple[Path, Path]) -> None:
    run, _ = runs
    log = (run / "logs" / "rank0.log").read_text()
    assert "eval at step 2: tiny_mc/acc" in log and "eval at step 4:" in log and "ppl/chat" in log
    for row in eval_rows(run).values():
        assert row["eval/time_s"] > 0


def test_metric_keys() -> None:
    assert metric_key("tiny_mc", "acc,none") == "eval/tiny_mc/acc"
    assert metric_key("tiny_mc", "acc_stderr,none") == "eval/tiny_mc/acc_stderr"
    assert metric_key("tiny_gen", "exact_match,strip") == "eval/tiny_gen/exact_match_strip"
    assert metric_key("tiny_gen", "exact_match_stderr,strip") == "eval/tiny_gen/exact_match_strip_stderr"
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A", "samples": 3}}}
    assert logged_metrics(results) == {"eval/t/acc": 0.5}


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["eval.limit=3"], "eval.limit=3 is set but eval.tasks is empty"),
        (["eval.interval=5"], "eval.interval=5 is set but eval.tasks and eval.files are empty"),
        (["eval.files=[/no/such/file.txt]"], "eval.files: /no/such/file.txt is not a file"),
        ([TASKS, "eval.include_path=/no/such/dir"], "eval.include_path=/no/such/dir is not a directory"),
        (["eval.files=[a/x.txt,b/x.txt]"], "two files share a name"),
        ([TASKS, "eval.batch_size=0"], "eval.batch_size must be positive"),
    ],
)
def test_refusals(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        cfg, _ = compose_config(overrides)
        check_run(cfg)
    assert message in str(refused.value) and "\n" not in str(refused.value)


def test_local_tasks_skip_indexing_the_registry() -> None:
    from trainer.evaluate import task_manager

    assert sorted(task_manager([], ["tiny_mc", "tiny_tasks"]).all_tasks) == [
        "tiny_gen", "tiny_mc", "tiny_rolling", "tiny_tasks"]  # fmt: skip


@pytest.mark.slow  # indexes lm_eval's whole registry (~15 s)
def test_a_missing_task_is_refused_before_the_run(tmp_path: Path) -> None:
    """A task name only the registry could hold: the whole registry is searched (seconds), then one line."""
    done = run_cli("eval.tasks=[tiny_mcq]", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2
    assert "eval.tasks: unknown task 'tiny_mcq' (close: tiny_mc" in done.stderr
    assert "eval.include_path=DIR" in done.stderr
    assert not (tmp_path / "run").exists()
