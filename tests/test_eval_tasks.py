"""trainer/evaluation/tasks: the tiny local lm_eval tasks load through TaskManager(include_path=...) from any
working directory (their jsonl data sits next to the YAML) and lm_eval's `hf` model scores every item of each
with finite, in-range metrics that agree with its own per-sample records."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import hf_gpt2, save_tiny_tokenizer

pytest.importorskip("lm_eval")
pytestmark = pytest.mark.slow  # lm_eval indexes its whole task registry (~10 s) before the tasks run

TASK_DIR = Path(__file__).resolve().parent.parent / "trainer" / "evaluation" / "tasks"
TASKS = ["tiny_mc", "tiny_rolling", "tiny_gen"]
SIZES = {name: sum(1 for _ in (TASK_DIR / f"{name}.jsonl").open()) for name in TASKS}


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny_gpt2")
    vocab = save_tiny_tokenizer(path, "gpt2")
    torch.manual_seed(0)
    hf_gpt2(vocab_size=vocab, n_positions=128, n_embd=32, n_head=2).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def manager():
    """One index of lm_eval's registry plus TASK_DIR (building it reads lm_eval's few thousand YAMLs: ~8 s)."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASK_DIR))


def test_the_tasks_and_their_tag_load_from_another_working_directory(manager, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative data_files would resolve here, where there is nothing
    loaded = manager.load(["tiny_tasks"])["tasks"]
    assert sorted(loaded) == sorted(TASKS)
    for name, task in loaded.items():
        assert len(task.test_docs()) == SIZES[name] and SIZES[name] >= 10, name
    docs = loaded["tiny_mc"].test_docs()
    starts = {choice[0] == " " for doc in docs for choice in doc["choices"]}
    assert starts == {True, False}  # continuations with and without a leading space


def test_lm_evals_hf_model_scores_every_item(manager, gpt2_dir: Path) -> None:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={gpt2_dir},dtype=float32", tasks=TASKS, task_manager=manager,
        batch_size=1, device="cpu", limit=None, log_samples=True,
    )  # fmt: skip
    results, samples = out["results"], out["samples"]
    assert {name: out["n-samples"][name]["effective"] for name in TASKS} == SIZES
    assert {name: len(samples[name]) for name in TASKS} == SIZES

    mc = results["tiny_mc"]
    assert 0 <= mc["acc,none"] <= 1 and 0 <= mc["acc_norm,none"] <= 1
    # acc is the mean over items of "the gold choice has the largest log-likelihood"
    picked = [max(range(4), key=lambda i: s["resps"][i][0][0]) == s["target"] for s in samples["tiny_mc"]]
    assert mc["acc,none"] == pytest.approx(sum(picked) / len(picked))
    # acc_norm: the same with each log-likelihood divided by its choice's length in characters
    picked_norm = [
        max(range(4), key=lambda i: s["resps"][i][0][0] / len(s["doc"]["choices"][i])) == s["target"]
        for s in samples["tiny_mc"]
    ]
    assert mc["acc_norm,none"] == pytest.approx(sum(picked_norm) / len(picked_norm))

    rolling = results["tiny_rolling"]
    for metric in ("word_perplexity", "byte_perplexity", "bits_per_byte"):
        assert math.isfinite(rolling[f"{metric},none"]), metric
    assert rolling["word_perplexity,none"] > rolling["byte_perplexity,none"] > 1
    # a random model over a ~400-token vocabulary: bits per byte sits near log2(perplexity per byte)
    assert rolling["bits_per_byte,none"] == pytest.approx(math.log2(rolling["byte_perplexity,none"]))
    assert rolling["bits_per_byte,none"] > 0.5

    gen = results["tiny_gen"]
    assert 0 <= gen["exact_match,strip"] <= 1
    replies = [s["filtered_resps"][0] for s in samples["tiny_gen"]]
    assert all(reply == reply.strip() and "\n" not in reply for reply in replies)
    targets = [json.loads(line)["answer"] for line in (TASK_DIR / "tiny_gen.jsonl").open()]
    assert [s["target"] for s in samples["tiny_gen"]] == targets
    matches = [reply == target for reply, target in zip(replies, targets, strict=True)]
    assert gen["exact_match,strip"] == pytest.approx(sum(matches) / len(matches))
