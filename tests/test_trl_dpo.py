"""objective=dpo against TRL 1.16's DPOTrainer on one tiny Llama (a llama3-style tokenizer that adds BOS),
fp32 on CPU. The reference is a random checkpoint; the policy is it plus noise, saved as a second
checkpoint, loaded by both sides (TRL: transformers; the harness: model.pretrained through its run's
path). The same string and TRL-conversational preference records go through TRL's tokenization and
collator and through data=preference (build_data); the rows must hold the same tokens and targets. Then
TRL's own _compute_loss (its loss and logged metrics) and compute_ref_log_probs (per-pair summed
log-probs) against DPO.pair_logps / DPO.loss / DPO.metrics, for sigmoid, ipo, hinge and robust.
Also the policy's gradient of the mean loss (TRL's mapped by hf_to_trainer). Two implementations' fp32
forwards differ by ~1e-6 per token. Measured: summed log-probs (-24 .. -167) within 8e-6 (1e-7 relative),
losses and rewards within 6e-7, gradients within 7e-7 of the largest entry.

Not compared, as TRL 1.16 differs: its sigmoid loss ignores label_smoothing (cDPO was dropped; only
robust, exo_pair and the aot losses read it), while the harness's sigmoid applies it."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from helpers import hf_llama, save_tiny_tokenizer

from trainer.config.load import compose_config
from trainer.data import build_data
from trainer.model.build import build_model
from trainer.model.hf_import import hf_to_trainer
from trainer.model.loss import IGNORE_INDEX
from trainer.objectives.dpo import DPO, METRICS
from trainer.parallel import build_strategy, parallelize
from trainer.preflight import resolve_model_config

BETA, SEQ_LEN = 0.1, 96
LOSSES = {"sigmoid": 0.0, "ipo": 0.0, "hinge": 0.0, "robust": 0.1}  # loss -> label_smoothing
# Completions start with a space or follow punctuation, so that no token merges across the prompt's end
# (TRL would then move the boundary; the harness tokenizes the two parts apart).
STRING_PAIRS = [
    {"prompt": "What is two plus two?", "chosen": " Two plus two is four.", "rejected": " Five."},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " The capital of France is a village."},
    {"prompt": "Tell me a story:", "chosen": " Once upon a time there was a dragon.", "rejected": " No."},
    {"prompt": "Hello, how are you today?", "chosen": " I am fine, thank you.", "rejected": " I am fine, thank you!"},
    {"prompt": "def add(x, y):", "chosen": "\n    return x + y", "rejected": "\n    return x - y + 1"},
]  # fmt: skip
CONVERSATION_PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Could you tell me a story about a knight?"}],
        "chosen": [{"role": "assistant", "content": "A knight lived near the mountains."}],
        "rejected": [{"role": "assistant", "content": "Thank you for asking!"}],
    },
    {
        "prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Numbers?"}],
        "chosen": [{"role": "assistant", "content": "0 1 2"}],
        "rejected": [{"role": "assistant", "content": "Lists, tuples and dictionaries hold values in Python."}],
    },
]
PAIRS = len(STRING_PAIRS) + len(CONVERSATION_PAIRS)


@pytest.fixture(scope="module")
def sides(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """TRL's DPOTrainer with its collated batch, and the harness's policy, reference copy and batch."""
    pytest.importorskip("trl")  # imported here, not at collection: it takes ~5-10 s
    import datasets
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    root = tmp_path_factory.mktemp("trl_dpo")
    ref_dir, policy_dir = root / "reference", root / "policy"
    vocab = save_tiny_tokenizer(ref_dir, "llama3")
    save_tiny_tokenizer(policy_dir, "llama3")
    torch.manual_seed(0)
    model = hf_llama(vocab_size=vocab, hidden_size=32, intermediate_size=48, max_position_embeddings=128)
    model.save_pretrained(ref_dir)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))  # the policy: the reference moved
    model.save_pretrained(policy_dir)

    # TRL: string records as its train set, conversational ones through the same _prepare_dataset
    args = DPOConfig(
        output_dir=str(root / "trl"), use_cpu=True, bf16=False, report_to=[], beta=BETA, loss_type=["sigmoid"],
        max_length=SEQ_LEN, precompute_ref_log_probs=False, per_device_train_batch_size=PAIRS,
    )  # fmt: skip
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32)
    trainer = DPOTrainer(
        model=str(policy_dir), ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(STRING_PAIRS)
    )
    conversations = trainer._prepare_dataset(
        datasets.Dataset.from_list(CONVERSATION_PAIRS), trainer.processing_class, args, "conversations"
    )
    rows = [*trainer.train_dataset, *conversations]
    inputs = trainer.data_collator(rows)
    trainer.model.train()
    assert trainer.model.dtype == trainer.ref_model.dtype == torch.float32

    # The harness: the same records through data=preference, the policy built as a run builds it
    path = root / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [*STRING_PAIRS, *CONVERSATION_PAIRS]))
    cfg, _ = compose_config([
        "objective=dpo", "data=preference", f"data.path={path}", f"data.cache_dir={root / 'cache'}",
        "data.chat_template=false",  # string prompts as TRL tokenizes them: plain text, with BOS
        "data.val_fraction=0.15", f"model.pretrained={policy_dir}", f"train.seq_len={SEQ_LEN}", "train.device=cpu",
        f"objective.beta={BETA}",
    ])  # fmt: skip
    data = build_data(cfg.data, cfg.train.seq_len, 0, pretrained=cfg.model.pretrained)
    batches = [split.get_batch(torch.arange(len(split)).numpy()) for split in (data.train, data.val)]
    x, y = (torch.cat(parts) for parts in zip(*batches, strict=True))  # every pair, in file order
    strategy = build_strategy(cfg)
    model_cfg = resolve_model_config(cfg.model, data.tokenizer.vocab_size)
    parallelize(*build_model(model_cfg, 0, cfg.quant), cfg, strategy)
    copy = strategy.frozen_copy(*build_model(dataclasses.replace(model_cfg, pretrained=str(ref_dir)), 0, cfg.quant))
    return types.SimpleNamespace(
        trainer=trainer, inputs=inputs, cfg=cfg, model_cfg=model_cfg, strategy=strategy, copy=copy, x=x, y=y
    )


def interleaved(chosen_then_rejected: torch.Tensor) -> torch.Tensor:
    """TRL's row order (all chosen, then all rejected) -> the harness's (chosen, rejected of each pair)."""
    chosen, rejected = chosen_then_rejected.chunk(2)
    return torch.stack([chosen, rejected], dim=1).flatten(0, 1)


def harness_dpo(sides: types.SimpleNamespace, loss: str) -> DPO:
    objective = dataclasses.replace(sides.cfg.objective, loss=loss, label_smoothing=LOSSES[loss])
    dpo = DPO(dataclasses.replace(sides.cfg, objective=objective))
    dpo.copy = sides.copy
    return dpo


def trl_metrics(trainer, loss: str, inputs: dict) -> tuple[float, dict[str, float]]:
    """TRL's _compute_loss with loss_type=[loss]: its loss and the metrics it logs."""
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss], [1.0], LOSSES[loss]
    trainer._metrics["train"].clear()
    with torch.no_grad():
        value = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return value.item(), {name: values[-1] for name, values in trainer._metrics["train"].items()}


def test_rows_hold_trls_tokens_and_targets(sides):
    """data=preference renders each record to TRL's ids (BOS, the completion, eos), targets its completion."""
    ids, attention, completion = (interleaved(sides.inputs[k]) for k in ("input_ids", "attention_mask", "completion_mask"))  # fmt: skip
    assert len(ids) == len(sides.x) == 2 * PAIRS
    width = ids.size(1)
    assert width <= SEQ_LEN and not sides.y[:, width - 1 :].ne(IGNORE_INDEX).any()  # nothing truncated
    real = attention.bool()
    assert torch.equal(sides.x[:, :width][real], ids[real])
    labels = ids.masked_fill(completion == 0, IGNORE_INDEX)[:, 1:]  # TRL's targets, shifted as ours
    assert torch.equal(sides.y[:, : width - 1], labels)
    bos, eos = sides.trainer.processing_class.bos_token_id, sides.trainer.processing_class.eos_token_id
    assert (ids[:, 0] == bos).all() and (ids[:, 1:] != bos).all()  # one BOS: the string prompts' and the template's
    ends = attention.sum(dim=1) - 1
    assert (ids[torch.arange(len(ids)), ends] == eos).all()  # every completion ends in eos, a target
    lengths = completion.sum(dim=1).view(PAIRS, 2)
    assert (lengths[:, 0] > lengths[:, 1]).any() and (lengths[:, 0] < lengths[:, 1]).any()


def test_pair_logps_match_trl(sides):
    """Each row's summed completion log-prob, policy and reference, as TRL's compute_ref_log_probs gives them."""
    trainer = sides.trainer
    ours, ours_ref, _ = harness_dpo(sides, "sigmoid").pair_logps(sides.strategy, {"x": sides.x, "y": sides.y})
    theirs = interleaved(torch.cat(trainer.compute_ref_log_probs(trainer.model, sides.inputs)))
    theirs_ref = interleaved(torch.cat(trainer.compute_ref_log_probs(trainer.ref_model, sides.inputs)))
    torch.testing.assert_close(ours.detach(), theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours_ref, theirs_ref, rtol=1e-5, atol=1e-5)
    assert ((ours - ours_ref).abs() > 0.05).all()  # the policy is not the reference


@pytest.mark.parametrize("loss", list(LOSSES))
def test_loss_and_metrics_match_trl(sides, loss):
    """DPO.loss / DPO.metrics (dpo_losses, dpo_rewards) against DPOTrainer._compute_loss and its logged metrics."""
    dpo = harness_dpo(sides, loss)
    with torch.no_grad():
        total, sums = dpo.loss(sides.strategy, {"x": sides.x, "y": sides.y})
    ours = dpo.metrics({k: v.item() for k, v in sums.items()}, PAIRS)
    theirs_loss, theirs = trl_metrics(sides.trainer, loss, sides.inputs)
    assert total.item() / PAIRS == pytest.approx(theirs_loss, rel=1e-5, abs=1e-6)
    for name in METRICS:
        tolerance = dict(rel=1e-5) if name.startswith("logps/") else dict(abs=1e-6)
        assert ours[name] == pytest.approx(theirs[name], **tolerance), name
    assert 0 < theirs["rewards/accuracies"] < 1  # some pairs' rewards ordered each way
    assert abs(theirs["rewards/chosen"]) > 0.1 and abs(theirs["rewards/margins"]) > 0.01  # the policy moved


@pytest.mark.parametrize("loss", list(LOSSES))
def test_gradient_matches_trl(sides, loss):
    """The policy's gradient of the mean pair loss: TRL's (mapped to GPT's names) against the harness's."""
    model, trainer = sides.strategy.unwrapped(), sides.trainer
    total, _ = harness_dpo(sides, loss).loss(sides.strategy, {"x": sides.x, "y": sides.y})
    names, params = zip(*model.named_parameters(), strict=True)
    ours = dict(zip(names, torch.autograd.grad(total / PAIRS, params), strict=True))
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss], [1.0], LOSSES[loss]
    hf_names, hf_params = zip(*trainer.model.named_parameters(), strict=True)
    hf_grads = torch.autograd.grad(trainer._compute_loss(trainer.model, sides.inputs, False), hf_params)
    theirs = hf_to_trainer(dict(zip(hf_names, hf_grads, strict=True)), sides.model_cfg)
    assert set(theirs) == set(ours)
    scale = max(g.abs().max() for g in theirs.values())
    worst = max(((ours[k] - theirs[k]).abs().max() / scale).item() for k in ours)
    assert worst < 1e-4
