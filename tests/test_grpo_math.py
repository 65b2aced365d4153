"""trainer/objectives/losses.py against TRL 1.16's own code, on fixed completions and rewards: a real
GRPOTrainer and RLOOTrainer (a tiny random Qwen2 on CPU) are built once; their advantage code runs inside
_generate_and_score_completions with generation and scoring replaced by fixed completions and rewards,
and their loss is _compute_loss on hand-built inputs. The harness's side takes per-token log-probs of the
same model (log_softmax of its logits: what is tested is the loss math) through clipped_objective,
k3_kl, reduce_token_losses and token_loss_denominator. The model runs in float64, but TRL's fused LM head
gives float32 log-probs (6e-7 from ours at most): that bounds the agreement, measured ~3e-8 in the loss and
~1e-6 of the largest gradient entry. Also: accumulation over micro-batches changes no gradient."""

from __future__ import annotations

import types

import pytest
import torch
from helpers import hf_qwen2, save_tiny_tokenizer

from trainer.objectives import losses

G, PROMPTS, PROMPT_LEN, MAX_NEW = 4, 2, 3, 6  # generations per prompt, prompts, prompt tokens, max completion tokens
ROWS = G * PROMPTS
BETA, EPSILON, EPSILON_HIGH = 0.04, 0.2, 0.28
LENGTHS = [6, 4, 6, 2, 5, 6, 3, 6]  # completion lengths: unequal, so the three reductions differ
REWARDS = [1.5, 0.0, 2.5, 0.5, 0.7, 0.7, 0.7, 0.7]  # the second group ties: std 0, advantages 0
LOSS_TYPES = ["grpo", "dr_grpo", "dapo"]


@pytest.fixture(scope="module")
def trl_trainers(tmp_path_factory: pytest.TempPathFactory) -> types.SimpleNamespace:
    """One GRPOTrainer (beta > 0: a reference model) and one RLOOTrainer (beta 0) over a tiny Qwen2,
    in train mode with one accumulation step, in float64."""
    pytest.importorskip("trl")  # imported here, not at collection: it takes ~10 s
    import datasets
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    root = tmp_path_factory.mktemp("grpo_math")
    model_dir = root / "model"
    vocab = save_tiny_tokenizer(model_dir, "qwen2")
    torch.manual_seed(0)
    hf_qwen2(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=1).save_pretrained(model_dir)
    dataset = datasets.Dataset.from_dict({"prompt": ["hello"] * ROWS})
    common = dict(
        use_cpu=True, bf16=False, per_device_train_batch_size=ROWS, num_generations=G, max_completion_length=MAX_NEW,
        report_to=[], epsilon=EPSILON, epsilon_high=EPSILON_HIGH, temperature=1.0,
    )  # fmt: skip

    def unused_reward(completions, **kwargs):  # scoring is replaced by fixed rewards below
        return [0.0] * len(completions)

    grpo = GRPOTrainer(
        model=str(model_dir), reward_funcs=unused_reward, train_dataset=dataset,
        args=GRPOConfig(output_dir=str(root / "grpo"), beta=BETA, **common),
    )  # fmt: skip
    rloo = RLOOTrainer(
        model=str(model_dir), reward_funcs=unused_reward, train_dataset=dataset,
        args=RLOOConfig(output_dir=str(root / "rloo"), beta=0.0, **common),
    )  # fmt: skip
    for trainer in (grpo, rloo):
        trainer.model.double().train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which does not run here
    grpo.ref_model.double()
    return types.SimpleNamespace(grpo=grpo, rloo=rloo, pad=grpo._tokenizer.pad_token_id, vocab=vocab)


@pytest.fixture(scope="module")
def batch(trl_trainers) -> dict[str, torch.Tensor]:
    """Fixed prompts and right-padded completions (ROWS, MAX_NEW), GRPO advantages of REWARDS, and old /
    reference log-probs that differ from the current model's (noise of std 0.3 / 0.2), so clipping bites."""
    generator = torch.Generator().manual_seed(0)
    vocab = trl_trainers.vocab - 8  # ordinary tokens, no specials
    prompt_ids = torch.randint(8, vocab, (PROMPTS, PROMPT_LEN), generator=generator).repeat_interleave(G, dim=0)
    completion_mask = (torch.arange(MAX_NEW)[None] < torch.tensor(LENGTHS)[:, None]).long()
    completion_ids = torch.randint(8, vocab, (ROWS, MAX_NEW), generator=generator)
    completion_ids = completion_ids.masked_fill(completion_mask == 0, trl_trainers.pad)
    inputs = dict(
        prompt_ids=prompt_ids, prompt_mask=torch.ones_like(prompt_ids), completion_ids=completion_ids,
        completion_mask=completion_mask,
    )  # fmt: skip
    with torch.no_grad():
        current = token_logps(trl_trainers.grpo.model, inputs)
    noise = torch.randn((2, ROWS, MAX_NEW), generator=generator, dtype=torch.float64)
    rewards = torch.tensor(REWARDS, dtype=torch.float64)
    return dict(
        inputs, advantages=losses.group_advantages(rewards, G, "group"), old_per_token_logps=current + 0.3 * noise[0],
        ref_per_token_logps=current + 0.2 * noise[1], num_items_in_batch=completion_mask.sum(),
    )  # fmt: skip


def token_logps(model, inputs: dict) -> torch.Tensor:
    """(rows, completion) log p of each completion token: log_softmax of the transformers model's logits."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    width = inputs["completion_ids"].size(1)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, -width - 1 : -1]  # those that predict the completion
    return logits.log_softmax(dim=-1).gather(-1, inputs["completion_ids"][..., None]).squeeze(-1)


def harness_numerator(
    model, inputs: dict, loss_type: str, bias_correction: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """losses.py's numerator for these rows (clipped ratio + beta k3 KL per token, the KL times the ratio
    with bias_correction, as TRL's use_bias_correction_kl), and where the clip bites."""
    logps = token_logps(model, inputs)
    old = inputs["old_per_token_logps"]
    per_token, active = losses.clipped_objective(logps, old, inputs["advantages"][:, None], EPSILON, EPSILON_HIGH)
    kl = losses.k3_kl(logps, inputs["ref_per_token_logps"])
    per_token = per_token + BETA * (kl * torch.exp(logps - old) if bias_correction else kl)
    mask = inputs["completion_mask"]
    return losses.reduce_token_losses(per_token, mask, loss_type), active & mask.bool()


def gradient(loss: torch.Tensor, model) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("bias_correction", [False, True])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_loss_and_gradient_match_trl(trl_trainers, batch, monkeypatch, loss_type, bias_correction):
    """GRPOTrainer._compute_loss (grpo_trainer.py ~line 3020-3170) against the harness's pieces. TRL 1.16's
    default use_bias_correction_kl=True multiplies the k3 KL by the (differentiable) ratio pi / pi_old
    (DeepSeek-V3.2): its gradient differs even on-policy. The harness's plain beta * k3 (what
    trainer/objectives/grpo.py adds) is TRL with use_bias_correction_kl=False; True is matched by
    composing k3_kl * ratio here."""
    trainer = trl_trainers.grpo
    monkeypatch.setattr(trainer, "loss_type", loss_type)  # _compute_loss reads it; nothing built from it
    monkeypatch.setattr(trainer.args, "use_bias_correction_kl", bias_correction)
    model = trainer.model
    theirs = trainer._compute_loss(model, batch)
    numerator, active = harness_numerator(model, batch, loss_type, bias_correction)
    ours = numerator / losses.token_loss_denominator(batch["completion_mask"], loss_type, MAX_NEW)
    assert active.any() and not active.all(), "the clip should bite on some completion tokens, not all"
    loss_diff = (ours - theirs).abs().item()
    g_ours, g_theirs = gradient(ours, model), gradient(theirs, model)
    grad_diff = ((g_ours - g_theirs).abs().max() / g_theirs.abs().max()).item()
    print(f"{loss_type}, bias_correction={bias_correction}: loss {theirs.item():.6f}, |diff| {loss_diff:.1e}; "
          f"gradient max |diff| / max {grad_diff:.1e}")  # fmt: skip
    assert loss_diff < 1e-6 and grad_diff < 1e-5, f"loss diff {loss_diff:.2e}, gradient diff {grad_diff:.2e}"
    if bias_correction:  # the plain beta * k3 is another gradient than TRL's default: the test tells them apart
        plain = harness_numerator(model, batch, loss_type)[0] / losses.token_loss_denominator(
            batch["completion_mask"], loss_type, MAX_NEW
        )
        apart = ((gradient(plain, model) - g_theirs).abs().max() / g_theirs.abs().max()).item()
        print(f"{loss_type}: plain beta * k3 against TRL's default (KL times the ratio): gradient diff {apart:.1e}")
        assert apart > 1e-3


def fixed_rollouts(trainer, batch: dict, monkeypatch: pytest.MonkeyPatch, rloo: bool) -> None:
    """Replace generation and scoring: _generate returns the batch's completions, _calculate_rewards REWARDS."""
    prompt_ids = batch["prompt_ids"].tolist()
    completion_ids = [row[:n] for row, n in zip(batch["completion_ids"].tolist(), LENGTHS, strict=True)]
    texts = ["completion"] * ROWS
    if rloo:
        generated = (prompt_ids, completion_ids, texts)
    else:  # prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images
        generated = (prompt_ids, completion_ids, None, texts, None, {}, None, None)
    monkeypatch.setattr(trainer, "_generate", lambda prompts: generated)
    rewards = torch.tensor(REWARDS)[:, None]  # (rows, reward functions), float32 as TRL's own
    monkeypatch.setattr(trainer, "_calculate_rewards", lambda *args: rewards)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_trl(trl_trainers, batch, monkeypatch, scale):
    """GRPOTrainer's advantages (grpo_trainer.py ~line 2760-2800, nanstd from trl.trainer.utils)."""
    trainer = trl_trainers.grpo
    fixed_rollouts(trainer, batch, monkeypatch, rloo=False)
    monkeypatch.setattr(trainer, "scale_rewards", scale)
    theirs = trainer._generate_and_score_completions([{"prompt": "hello"}] * ROWS)["advantages"]
    ours = losses.group_advantages(torch.tensor(REWARDS), G, scale)
    diff = (ours - theirs).abs().max().item()
    print(f"scale_rewards={scale}: advantages max |diff| {diff:.1e}")
    assert diff < 1e-6, f"{ours} vs TRL {theirs}"
    assert (ours[G:] == 0).all() and ours[:G].abs().min() > 0.1  # the tied group gets 0, the other does not


def test_rloo_advantages_and_loss_match_trl(trl_trainers, batch, monkeypatch):
    """RLOOTrainer's leave-one-out advantages (rloo_trainer.py ~line 1680-1690) and its sequence-level
    clipped loss (~line 1820-1830): the ratio of summed log-probs, the mean over sequences."""
    trainer = trl_trainers.rloo
    fixed_rollouts(trainer, batch, monkeypatch, rloo=True)
    out = trainer._generate_and_score_completions([{"prompt": "hello"}] * ROWS)
    advantages = losses.rloo_advantages(torch.tensor(REWARDS), G)
    diff = (advantages - out["advantages"]).abs().max().item()
    print(f"RLOO advantages max |diff| {diff:.1e}")
    assert diff < 1e-6, f"{advantages} vs TRL {out['advantages']}"

    mask = batch["completion_mask"]
    old = (batch["old_per_token_logps"] * mask).sum(dim=1)
    inputs = {**batch, "advantages": advantages.double(), "old_logps": old}
    theirs = trainer._compute_loss(trainer.model, inputs)
    logps = (token_logps(trainer.model, inputs) * mask).sum(dim=1)
    per_sequence, active = losses.clipped_objective(logps, old, inputs["advantages"], EPSILON, EPSILON_HIGH)
    ours = per_sequence.sum() / ROWS
    assert active.any() and not active.all()
    g_ours, g_theirs = gradient(ours, trainer.model), gradient(theirs, trainer.model)
    grad_diff = ((g_ours - g_theirs).abs().max() / g_theirs.abs().max()).item()
    loss_diff = (ours - theirs).abs().item()
    print(f"RLOO loss {theirs.item():.6f}, |diff| {loss_diff:.1e}; gradient max |diff| / max {grad_diff:.1e}")
    assert loss_diff < 1e-6 and grad_diff < 1e-5, f"loss diff {loss_diff:.2e}, gradient diff {grad_diff:.2e}"


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_accumulation_changes_no_gradient(trl_trainers, batch, loss_type):
    """8 rows in 1, 2 or 4 micro-batches, each numerator over the global denominator (token_loss_denominator
    summed over the micro-batches), gradients summed: the one-batch gradient. The micro-batches hold
    different numbers of completion tokens, so a per-micro-batch denominator would not (checked for dapo)."""
    model = trl_trainers.grpo.model

    def accumulated(pieces: int, global_denominator: bool = True) -> torch.Tensor:
        chunks = [{k: v.chunk(pieces)[i] for k, v in batch.items() if k != "num_items_in_batch"} for i in range(pieces)]
        denominators = [losses.token_loss_denominator(c["completion_mask"], loss_type, MAX_NEW) for c in chunks]
        total = sum(denominators)
        grads = [
            gradient(harness_numerator(model, c, loss_type)[0] / (total if global_denominator else d * pieces), model)
            for c, d in zip(chunks, denominators, strict=True)
        ]  # fmt: skip
        return sum(grads)

    whole = accumulated(1)
    for pieces in (2, 4):
        diff = ((accumulated(pieces) - whole).abs().max() / whole.abs().max()).item()
        print(f"{loss_type}: {pieces} micro-batches vs 1, gradient max |diff| / max {diff:.1e}")
        assert diff < 1e-6, f"{loss_type}, {pieces} micro-batches: {diff:.2e}"
    if loss_type == "dapo":  # the mean of per-micro-batch token means is another gradient
        local = ((accumulated(4, global_denominator=False) - whole).abs().max() / whole.abs().max()).item()
        assert local > 1e-3, f"per-micro-batch denominators should differ, got {local:.2e}"
