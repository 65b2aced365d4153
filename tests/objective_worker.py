"""Two steps of objective=dpo / grpo on a tiny LoRA model, on fixed batches, through train_step and the
real strategy code; run by tests/test_objective_ranks.py, under torchrun or as one process:

    torchrun --nproc_per_node 2 tests/objective_worker.py OUT.pt ddp/dpo fsdp/grpo-dapo zero3/grpo-grpo ...
    python tests/objective_worker.py OUT.pt none/dpo none/grpo-dapo ...

A case is STRATEGY/OBJECTIVE (OBJECTIVES below); one torchrun runs every case in one process group (each
launch costs seconds of imports). Every case starts from the same weights: the seeded base and LoRA
adapters drawn away from their zero init (B = 0 would make the policy its own reference), streamed
through the weight source so that FSDP and ZeRO-3 shard the same values (but see test_objective_ranks.py:
under ZeRO-3 the seeded base is not the same). The global batch is fixed;
each rank trains its contiguous share of it (DPO: whole pairs; GRPO: whole groups). Rank 0 saves, per
case: each step's loss, grad norm and objective figures, its rows' reference log-probs (GRPO) and
the adapters before and after the two steps.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import LLAMA_LIKE  # noqa: E402

from trainer.model.loss import IGNORE_INDEX  # noqa: E402

ROWS_PER_MICRO = 4  # DPO: 2 pairs; GRPO: 4 completions
WORLD = 2
STEPS = 2
CLIP = 0.03  # below the first step's norm of every case: the clip is part of what ranks must agree on
# Adam's eps far above every gradient entry: each update is ~ lr x (a moment of the gradient), linear in
# it, so rounding noise in a near-zero gradient stays small in the weights (dist_worker.py says why).
OPTIM = ["optim.lr=10.0", "optim.eps=1.0", "optim.weight_decay=0.0", "optim.warmup_steps=0", "optim.schedule=constant"]
GRPO = ["objective=grpo", "objective.rewards=[exact_match]", "objective.beta=0.04", "objective.num_generations=4",
        "objective.max_new_tokens=8"]  # fmt: skip
OBJECTIVES = {  # name -> overrides
    "dpo": ["objective=dpo", "objective.beta=0.5"],
    "grpo-dapo": [*GRPO, "objective.loss_type=dapo"],  # token losses / the global completion tokens
    "grpo-grpo": [*GRPO, "objective.loss_type=grpo"],  # each row's mean token loss / the global rows
}
GLOBAL_ROWS = 16  # DPO: 8 pairs; GRPO: 4 prompts x 4 generations
PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 60], [7, 7], [23, 88, 1, 50]]
COMPLETION_LENGTHS = [[1, 5, 8, 3], [2, 6, 4, 7], [8, 1, 3, 2], [4, 4, 6, 5]]  # (prompts, generations)
REWARDS = [1, 0, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 0, 1, 1, 1]  # a group of equal rewards would have no signal


PARALLEL = {"tp": ["parallel=none", f"parallel.tensor={WORLD}"]}  # tensor parallelism alone: both ranks, one batch


def config(strategy: str, objective: str):
    from trainer.config.load import compose_config

    accum = GLOBAL_ROWS // ROWS_PER_MICRO // (1 if strategy in ("none", "tp") else WORLD)
    micro = ROWS_PER_MICRO // 2 if objective == "dpo" else ROWS_PER_MICRO // 4  # pairs / prompts
    # lora.alpha = 1 (scale 1 / r): adapters of 0.2 x N(0, 1) then move each weight by about as much as the
    # base's own init; at alpha / r = 8 they would swamp it, and in so ill-conditioned a model a 1e-7
    # relative change of the weights moves the second step's gradient by 1e-3.
    overrides = [
        *(f"model.{k}={v}" for k, v in LLAMA_LIKE.items()), "lora=default", "lora.r=4", "lora.alpha=1.0",
        "lora.base_dtype=fp32", "precision=fp32", *PARALLEL.get(strategy, [f"parallel={strategy}"]),
        f"train.micro_batch_size={micro}", f"train.grad_accum_steps={accum}",
        f"optim.clip_grad_norm={CLIP}", "train.device=cpu", *OPTIM, *OBJECTIVES[objective],
    ]  # fmt: skip
    cfg, _ = compose_config(overrides)
    return cfg, accum


def random_adapters(weights):
    """The weight source with every LoRA tensor drawn as 0.2 x N(0, 1), seeded by its name (the same
    values on every rank and in every strategy, whatever order the strategy reads them in)."""

    def source(device: torch.device):
        for name, tensor in weights(device):
            if ".lora_" in name:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                tensor = (0.2 * torch.randn(tensor.shape, generator=g)).to(tensor)
            yield name, tensor

    return source


def build(cfg):
    """The strategy cfg names holding the tiny model with LoRA adapters off their init (the loop's path:
    meta device -> adapters -> sharded and materialised from the weight source)."""
    from trainer.lora.run import add_adapters
    from trainer.model.build import build_model
    from trainer.parallel import build_strategy, parallelize

    strategy = build_strategy(cfg)
    model, weights = build_model(cfg.model, 0, cfg.quant)
    weights, _, _ = add_adapters(model, weights, cfg, cfg.model)
    parallelize(model, random_adapters(weights), cfg, strategy)
    return strategy


def preference_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """GLOBAL_ROWS / 2 pairs: rows 2k / 2k + 1 share a prompt, completions of different lengths after it."""
    vocab, T = LLAMA_LIKE["vocab_size"], LLAMA_LIKE["block_size"]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, vocab, (GLOBAL_ROWS, T), generator=g)
    y = torch.full_like(x, IGNORE_INDEX)
    for k in range(GLOBAL_ROWS // 2):
        prompt = 2 + k % 4
        x[2 * k + 1, :prompt] = x[2 * k, :prompt]
        for row, end in ((2 * k, T - k), (2 * k + 1, T - 3 + k % 3)):
            y[row, prompt - 1 : end - 1] = x[row, prompt:end]
    return {"x": x, "y": y}


def completions_batch(seed: int = 1) -> dict[str, torch.Tensor]:
    """PROMPTS x 4 generations with fixed completions of different lengths, their advantages from
    fixed rewards (group_advantages: within each group of 4)."""
    from trainer.objectives.grpo import rows
    from trainer.objectives.losses import group_advantages

    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for prompt, lengths in zip(PROMPTS, COMPLETION_LENGTHS, strict=True):
        for n in lengths:
            prompts.append(prompt)
            completions.append(torch.randint(1, LLAMA_LIKE["vocab_size"], (n,), generator=g).tolist())
    x, y = rows(prompts, completions, 0, torch.device("cpu"))
    advantages = group_advantages(torch.tensor(REWARDS, dtype=torch.float32), 4, "group")
    return {"x": x, "y": y, "advantages": advantages}


def run_case(name: str) -> dict:
    """Build, then STEPS train_steps on this rank's share of the fixed global batch."""
    from trainer.data import shard_for_rank
    from trainer.objectives import build_objective
    from trainer.step import train_step

    strategy_name, objective_name = name.split("/")
    cfg, accum = config(strategy_name, objective_name)
    strategy = build(cfg)
    objective = build_objective(cfg)
    unit = 2 if objective_name == "dpo" else 4  # rows that stay together on one rank: a pair, a group
    units = shard_for_rank(torch.arange(GLOBAL_ROWS // unit).numpy(), strategy.dp_rank, strategy.dp_size)
    mine = torch.cat([torch.arange(u * unit, (u + 1) * unit) for u in units.tolist()])
    initial = strategy.full_state_dict(trainable_only=True)  # collective; on CPU, none / ddp: the live tensors
    out: dict = {"rows": mine, "steps": [], "initial": {k: v.clone() for k, v in initial.items()}}
    if objective_name == "dpo":
        batch = {k: v[mine] for k, v in preference_batch().items()}  # the reference: adapters off, in the loss
    else:
        whole = completions_batch()
        batch = {k: v[mine] for k, v in whole.items()}
        ref = objective.reference_logps(strategy, batch["x"], batch["y"])  # (rows, T), 0 off the completion
        # old = ref + noise: the ratio starts away from 1 (a second iteration's), so the clip bites
        noise = 0.3 * torch.randn(whole["y"].shape, generator=torch.Generator().manual_seed(3))[mine]
        batch["ref_logps"], batch["old_logps"] = ref, ref + noise * (batch["y"] != IGNORE_INDEX)
        out["ref_logps"] = ref
    for _ in range(STEPS):
        result = train_step(strategy, None, None, accum, CLIP, objective=objective, batch=batch)
        figures = {k: v for k, v in result.objective.items() if not k.startswith("time/")}  # clocks differ
        out["steps"].append({"loss": result.loss, "grad_norm": result.grad_norm, "figures": figures,
                             "target_tokens": result.target_tokens, "stepped": result.stepped})  # fmt: skip
    out["weights"] = strategy.full_state_dict(trainable_only=True)  # collective
    return out


def main() -> None:
    out, names = sys.argv[1], sys.argv[2:]
    results = {name: run_case(name) for name in names}
    import torch.distributed as dist

    if not dist.is_initialized():
        torch.save(results, out)
        return
    from trainer.parallel.dist import exit_process

    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    exit_process(0)  # as `python -m trainer` ends: no interpreter teardown under gloo's live threads


if __name__ == "__main__":
    main()
