"""HarnessLM's generation (trainer/evaluation/lm.py): a row ends at its first stop string, as lm_eval's `hf`
model's stopping criteria end it, with the reply lm_eval keeps unchanged and fewer forwards; the
per-document lists of several ranks are merged back into one process's order."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import hf_gpt2, save_tiny_tokenizer

pytest.importorskip("lm_eval")

CONTEXTS = ["the quick brown fox", "capital of France is", "two plus four"]


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory):
    from trainer.evaluate import load_source
    from trainer.evaluation.lm import HarnessLM

    root: Path = tmp_path_factory.mktemp("harness_lm")
    vocab = save_tiny_tokenizer(root, "gpt2")
    torch.manual_seed(0)
    hf_gpt2(vocab_size=vocab, n_positions=128, n_embd=32, n_head=2).save_pretrained(root)
    model, tokenizer, _ = load_source(root)
    return HarnessLM(model, tokenizer, batch_size=2)


def generate(lm, until: list[str], max_gen_toks: int = 24) -> tuple[list[str], int]:
    """(lm_eval's replies, the model forwards they took)."""
    from lm_eval.api.instance import Instance

    requests = [
        Instance("generate_until", {}, (c, {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}), i)
        for i, c in enumerate(CONTEXTS)
    ]  # fmt: skip
    calls = []
    handle = lm.model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        return lm.generate_until(requests, disable_tqdm=True), len(calls)
    finally:
        handle.remove()


def test_a_row_ends_at_its_first_stop_string(lm) -> None:
    full, full_calls = generate(lm, until=[])
    assert all(len(reply) > 12 for reply in full), full  # random weights: no early eos in 24 tokens
    until = [reply[4:7] for reply in full]  # a string each reply holds, a few tokens in
    cut, cut_calls = generate(lm, until=until)

    def kept(reply: str) -> str:  # what lm_eval keeps of a reply: cut at each stop string in turn
        for term in until:
            reply = reply.split(term)[0]
        return reply

    assert cut == [kept(reply) for reply in full]  # the replies lm_eval keeps are unchanged
    assert all(len(reply) <= 4 for reply in cut)
    assert cut_calls < full_calls, (cut_calls, full_calls)  # every row stopped early: fewer forwards


def test_ranks_lists_come_back_in_one_process_order() -> None:
    from trainer.evaluation.lm import interleaved, per_document

    ranks = [{"t": {("acc", "none"): [0, 2, 4]}}, {"t": {("acc", "none"): [1, 3]}}]
    assert all(per_document(r) for r in ranks)
    assert interleaved(ranks) == {"t": {("acc", "none"): [0, 1, 2, 3, 4]}}
    assert not per_document({"t": [1, 2]})
