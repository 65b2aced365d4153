"""Run by tests/test_expert_parallel.py: a tiny mixture-of-experts model (Mixtral's layout, 4 experts,
top 2, the load-balancing loss on) trained through the real loop, in one process or under torchrun.

    python tests/expert_worker.py train OUT reference
    torchrun --nproc_per_node 2 tests/expert_worker.py train OUT ddp-expert fsdp zero3
    torchrun --nproc_per_node 4 tests/expert_worker.py step OUT.pt

`train`: per column, into OUT/<column>/: `full` (train() for STEPS steps, a checkpoint at MID) and
shards.json (how rank 0 holds w_gate of block 0); for ddp-expert also `resumed` (a fresh run dir
resumed from full's mid-run checkpoint) and, on rank 0, `export` (python -m trainer.export of full,
Hugging Face layout). The columns share one process group (train() leaves a group it did not start
as it found it). A column that raises writes error.rank<R>.txt; the next one goes on.

`step`: one train_step at 4 ranks, where parallel.expert=2 makes 2 expert groups, so each block of
experts has 2 copies whose gradients are averaged across the groups; with 2 micro-batches a rank and
the noise scale's first-micro-batch probe (an early reduction). Rank 0 saves, for ddp with and
without parallel.expert=2 and for one process: the per-group gradient sums of squares, the global
norm, the probe's figures and the whole model's weights after the step.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS, MID, GLOBAL_BATCH = 4, 2, 16
MODEL = [  # Mixtral's layout (trainer.export writes MixtralForCausalLM), tiny
    "model.vocab_size=32", "model.n_layer=2", "model.n_embd=32", "model.n_head=2", "model.n_kv_head=1", "model.bias=false",
    "model.position=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.tie_embeddings=false",
    "model.n_experts=4", "model.n_experts_per_token=2", "model.moe_intermediate_size=48",
    "model.router_aux_loss_coef=0.01", "model.dropout=0",
]  # fmt: skip
BASE = [  # 4 sequences a micro-batch everywhere: ranks hold the reference's micro-batches (the aux loss is per micro-batch)
    "experiment=synthetic", "logger.wandb=false", "logger.progress_bar=false", "train.sample_tokens=0",
    "train.seq_len=32", "train.micro_batch_size=4", f"train.global_batch_size={GLOBAL_BATCH}",
    f"train.max_steps={STEPS}", "train.log_interval=1", f"train.eval_interval={STEPS}", "train.eval_batches=2",
    f"checkpoint.interval={MID}", "checkpoint.keep=8", "parallel.timeout_s=120", *MODEL,
]  # fmt: skip
COLUMNS = {  # column -> its parallel overrides
    "reference": ["parallel=none"],
    "ddp-expert": ["parallel=ddp", "parallel.expert=2"],
    "ddp": ["parallel=ddp"],
    "fsdp": ["parallel=fsdp"],
    "zero1": ["parallel=zero1"],
    "zero2": ["parallel=zero2"],
    "zero3": ["parallel=zero3"],
}


def overrides(column: str, out: Path) -> list[str]:
    return [*BASE, *COLUMNS[column], f"data.cache_dir={out / 'cache'}"]


def shards(cfg) -> dict:
    """How rank 0 holds block 0's w_gate (E, I, H) under cfg's strategy: the local tensor's shape,
    and FSDP's placements or ZeRO-3's partition size."""
    from helpers import build

    strategy = build(cfg)
    model = strategy.unwrapped()
    param = next(p for n, p in model.named_parameters() if n.endswith("blocks.0.mlp.w_gate"))
    local = param.to_local() if hasattr(param, "to_local") else param
    held = {"shape": list(local.shape), "full": list(getattr(param, "ds_shape", param.shape))}
    if hasattr(param, "placements"):
        held["placements"] = [str(p) for p in param.placements]
    if hasattr(param, "ds_tensor"):
        held["partition_numel"] = param.ds_tensor.numel()
    if strategy.experts is not None:
        held["full"] = strategy.experts.full_shapes["blocks.0.mlp.w_gate"]
    return held


def train_column(out: Path, column: str) -> None:
    from matrix_worker import rank_log

    from trainer.config.load import compose_config
    from trainer.loop import train

    rank = int(os.environ.get("RANK", "0"))
    where = out / column
    args = overrides(column, out)
    cfg, _ = compose_config(args)
    with rank_log(where / "full"):
        train(cfg, where / "full")
    held = shards(cfg)
    if rank == 0:
        (where / "shards.json").write_text(json.dumps(held))
    if column != "ddp-expert":
        return
    mid = where / "full" / "checkpoints" / f"step_{MID:08d}"
    cfg, _ = compose_config([*args, f"train.resume={mid}"])
    with rank_log(where / "resumed"):
        train(cfg, where / "resumed")
    if rank == 0:
        from trainer import export

        code = export.main([str(where / "full"), "--out", str(where / "export")])
        if code != 0:
            raise RuntimeError(f"trainer.export exited {code}")


def one_step(name: str) -> dict:
    """One clipped train_step with the noise probe on tests/dist_worker.py's masked batch (ranks and
    micro-batches with very different target counts), one sequence a micro-batch: 2 a rank at 4 ranks."""
    import dataclasses

    import dist_worker
    import torch
    from helpers import build, masked_global_batch

    from trainer.data import shard_for_rank
    from trainer.step import train_step

    cfg = dist_worker.config("ddp" if name.startswith("ddp") else "none")
    cfg.model = dataclasses.replace(
        dist_worker.MODEL, mlp="swiglu", n_experts=4, moe_intermediate_size=48, router_aux_loss_coef=0.01
    )
    cfg.parallel.expert = 2 if name == "ddp-expert" else 1
    strategy = build(cfg)
    x, y = masked_global_batch()
    rows = torch.from_numpy(shard_for_rank(torch.arange(len(x)).numpy(), strategy.rank, strategy.world_size))
    result = train_step(strategy, x[rows], y[rows], len(rows), dist_worker.CLIP, stats=True, noise_probe=True)
    return {
        "sums": {k: v.item() for k, v in result.grad_sumsq.items()},
        "params": {k: v.item() for k, v in result.param_sumsq.items()},
        "updates": {k: v.item() for k, v in result.update_sumsq.items()},
        "norm": result.grad_norm, "noise": list(result.noise), "weights": strategy.full_state_dict(),
    }  # fmt: skip


def main() -> None:
    import torch.distributed as dist

    mode, out, *columns = sys.argv[1:]
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        import datetime

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = int(os.environ.get("RANK", "0"))
    if mode == "step":
        import torch

        results = {name: one_step(name) for name in (["ddp", "ddp-expert"] if world > 1 else ["none"])}
        if rank == 0:
            torch.save(results, out)
    else:
        for column in columns:
            (out / column).mkdir(parents=True, exist_ok=True)
            try:
                train_column(out, column)
                (out / column / "done").write_text("ok\n")
            except BaseException:  # noqa: B036 (SystemExit from a refusal too: recorded, then the next column)
                (out / column / f"error.rank{rank}.txt").write_text(traceback.format_exc())
    from trainer.parallel.dist import exit_process

    exit_process(0)  # no interpreter teardown under gloo's live threads


if __name__ == "__main__":
    main()
