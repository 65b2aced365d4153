"""The feature x strategy matrix, declared once (torchtitan's integration-test table): a list of
features (rows), a list of strategies (columns), and for each cell what it must do: equal one
process within the row's tolerance, or be refused in one line. Adding a feature or a strategy is
adding one entry here. tests/test_matrix.py runs the cells; tests/matrix_worker.py trains them.

Every cell fine-tunes the same tiny random Llama (tests/helpers.build_finetune_dir; the moe row a
tiny Qwen3-MoE) on instruction
records (prompts masked, rows padded: micro-batches and ranks hold unequal target counts) for
STEPS steps of a global batch of GLOBAL_BATCH sequences, logging every step with the per-layer
statistics, a checkpoint at STEPS // 2, evaluation and a short closing sample at the end. The
reference is one process, 2 sequences a micro-batch; a 2-rank cell splits the same global batch
over the ranks (the `none` column is one process with another split: 4 a micro-batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")
ZERO = ("zero1", "zero2", "zero3")
STEPS = 4
MID = STEPS // 2  # the mid-run checkpoint every cell resumes from
GLOBAL_BATCH = 8

BASE = [  # every cell; model.pretrained, data.path and the cache dir are added per machine
    "logger.wandb=false", "logger.progress_bar=false", "data=instruct", "data.packing=false", "data.val_fraction=0.2",
    "train.seq_len=64", "train.eval_batches=2", f"train.global_batch_size={GLOBAL_BATCH}", f"train.max_steps={STEPS}",
    "train.log_interval=1", f"train.eval_interval={STEPS}", "train.sample_tokens=4", "train.sample_prompt=Q1",
    "optim.lr=3e-3", "optim.warmup_steps=0", f"checkpoint.interval={MID}", "checkpoint.keep=8",
    "parallel.timeout_s=120",
]  # fmt: skip
REFERENCE = ["parallel=none", "train.micro_batch_size=2"]
SPLITS = {  # the micro-batch each column uses: the global batch is the same everywhere
    "none": ["parallel=none", "train.micro_batch_size=4"],
    **{s: [f"parallel={s}", "train.micro_batch_size=2"] for s in STRATEGIES[1:]},
}
FP32 = 1e-5  # relative; the bound for fp32 cells (see Feature.tolerance)


@dataclass(frozen=True)
class Feature:
    """A row: its overrides, its tolerance and the strategies that refuse it (strategy -> a regex
    the one-line refusal must match).

    tolerance: relative, on every logged loss, every per-layer grad_norm / param_norm /
    update_ratio, and per tensor (norm of the difference over the norm) on the final weights,
    adapters and exports. fp32 rows: 1e-5. A row with another bound says why in `why`."""

    name: str
    overrides: tuple[str, ...] = ()
    tolerance: float = FP32
    why: str = ""
    refused: dict[str, str] = field(default_factory=dict)
    generate: bool = False  # also run `trainer.generate` on the run's checkpoint
    model: str = "llama"  # the tiny checkpoint fine-tuned (a directory of tests/helpers.build_finetune_dir)
    data: str = "instruct"  # the records it trains on (root/<data>.jsonl of tests/helpers.build_finetune_dir)
    spikes: bool = False  # the reference run must flag a spike (the row's policy acted)

    @property
    def runs(self) -> tuple[str, ...]:
        return tuple(s for s in STRATEGIES if s not in self.refused)


# 6 steps of 2 sequences (each step other records): this model's grad norm jumps at step 4 (z 3.9 to
# 5.3 against a 1-observation baseline; steps 1-3 stay under 3.2, so any z in 3.2-4 flags step 4 alone)
SPIKE = ("monitor.spike.z=3.5", "monitor.spike.warmup=1", "train.global_batch_size=2", "train.micro_batch_size=1",
         "train.max_steps=6")  # fmt: skip
ZERO_NO_SKIP = r"monitor.spike.action=(skip|rollback) is available for none / ddp / fsdp"
HALF = (
    "bf16 / fp16 compute: each strategy casts at another place (autocast over fp32 weights under none / "
    "ddp, which keeps norms and softmax in fp32; FSDP2's MixedPrecisionPolicy and DeepSpeed, which hold "
    "half-precision weights and run every op in it), so each activation and gradient is rounded at a "
    "different place, by up to 2^-8 (bf16) relative each time; a layer's gradient goes through tens of "
    "such roundings in the layers above it. 0.1 is ~25x bf16's unit roundoff; measured: up to 4.6e-2 on a "
    "per-layer grad_norm (bf16 x fsdp, a norm layer's), 1.9e-2 on the final weights, 5e-3 on the loss"
)
FEATURES = [
    Feature("plain"),
    Feature(
        "lora",
        ("lora=default", "lora.r=4"),
        why="the default bf16 base: each strategy reads the same bf16-rounded base, so fp32's bound holds",
    ),  # fmt: skip
    Feature("dora", ("lora=default", "lora.r=4", "lora.dora=true", "lora.base_dtype=fp32")),
    Feature(
        "qlora",
        ("lora=default", "lora.r=4", "lora.quantize_base=nf4", "lora.target_modules=[q_proj,v_proj]"),
        refused={s: r"lora.quantize_base=nf4 \(QLoRA\) runs with parallel=none only" for s in STRATEGIES[1:]},
    ),  # fmt: skip
    Feature("activation_checkpointing", ("model.activation_checkpointing=full",)),
    Feature(
        "compile",
        ("train.compile=true",),
        tolerance=1e-4,
        generate=True,
        why="inductor fuses the blocks' kernels, so fp32 sums run in another order than eager's (as "
        "test_compile's bound)",
        refused={s: r"train.compile=true with parallel=zero\d is not supported" for s in ZERO},
    ),  # fmt: skip
    Feature("packed_chat", ("data=chat", "data.packing=true", "data.document_mask=true"), data="chat"),
    Feature("unequal_accumulation", ("train.micro_batch_size=1",)),
    Feature("bf16", ("precision=bf16",), tolerance=0.1, why=HALF),
    Feature(
        "fp16",
        ("precision=fp16",),
        tolerance=0.1,
        why=HALF,
        refused={s: r"precision=fp16 with parallel=zero\d needs a GPU" for s in ZERO},  # on the CPU (these tests)
    ),  # fmt: skip
    Feature("noise_scale", ("diagnostics.noise_scale=true",)),
    Feature(
        "sharpness",
        (
            "diagnostics.sharpness.enabled=true",
            "diagnostics.sharpness.interval=2",
            "diagnostics.sharpness.iterations=4",
            "diagnostics.sharpness.batch_size=2",
        ),
        refused={s: r"diagnostics.sharpness.enabled=true is available for parallel=none / ddp / fsdp" for s in ZERO},
    ),  # fmt: skip
    Feature("spike_skip", ("monitor.spike.action=skip", *SPIKE), spikes=True, refused={s: ZERO_NO_SKIP for s in ZERO}),
    Feature(
        "spike_rollback",
        ("monitor.spike.action=rollback", "checkpoint.interval=1", *SPIKE),
        spikes=True,
        refused={s: ZERO_NO_SKIP for s in ZERO},
    ),  # fmt: skip
    Feature("prefetch_off", ("data.prefetch=false",)),
    Feature(
        "moe",
        ("train.micro_batch_size=2",),
        model="qwen3_moe",  # 4 experts top-2, the load-balancing loss in the loss (coef 0.02)
        tolerance=1e-4,
        why="the load-balancing loss is a function of each micro-batch's routing (as transformers' and "
        "Megatron's), so every column keeps the reference's micro-batches of 2 sequences (with 4, the none "
        "column's experts moved 1.1e-3 away). 1e-4: measured 1.4e-5 under zero3 on the least-routed "
        "expert's weights (ZeRO-3 reduces each micro-batch's gradient as it is made, the reference sums "
        "them first; that expert's gradient sums few tokens' terms), every other gap within 1e-5; a "
        "flipped routing choice or a misplaced expert moves weights by 1e-3 or more",
    ),  # fmt: skip
    # DPO (objective=dpo): the global batch counts pairs, each two rows; the loss is normalised by the
    # global batch's pairs. Under LoRA the reference is the policy with its adapters off; in full
    # fine-tuning a frozen copy held as the strategy holds the policy (FSDP2 shards, ZeRO-3 partitions).
    Feature("dpo", ("objective=dpo", "data=preference", "lora=default", "lora.r=4"), data="preference"),
    Feature("dpo_full", ("objective=dpo", "data=preference", "optim.lr=1e-3"), data="preference"),
    # In-loop downstream evaluation (eval.*): lm_eval's three output types on the shipped tiny tasks and
    # a held-out file's perplexity, at step 2 (before the mid-run checkpoint: the resume must still be
    # bitwise) and 4; each rank scores its share, the eval/* figures must equal one process's.
    Feature(
        "eval",
        ("eval.tasks=[tiny_mc,tiny_gen,tiny_rolling]", "eval.limit=6", "eval.interval=2", "eval.batch_size=3"),
    ),  # fmt: skip
]
BY_NAME = {f.name: f for f in FEATURES}


COVERING = {  # the default suite's cells: every feature once, every strategy at least once
    "plain": "ddp", "lora": "zero3", "dora": "fsdp", "qlora": "none", "activation_checkpointing": "zero2",
    "compile": "fsdp", "packed_chat": "zero3", "unequal_accumulation": "zero1", "bf16": "fsdp", "fp16": "ddp",
    "noise_scale": "ddp", "sharpness": "none", "spike_skip": "ddp", "spike_rollback": "fsdp", "prefetch_off": "none",
    "moe": "zero3", "dpo": "none", "dpo_full": "none", "eval": "zero3",
}  # fmt: skip


def covering() -> list[tuple[str, str]]:
    """The covering subset as (feature, strategy) cells, in the table's order."""
    return [(f.name, COVERING[f.name]) for f in FEATURES]


def cells() -> list[tuple[str, str]]:
    """Every cell of the full sweep."""
    return [(f.name, s) for f in FEATURES for s in STRATEGIES]


def overrides(feature: str, strategy: str | None) -> list[str]:
    """BASE + the row's overrides + the column's split (None: the one-process reference). A row that
    sets its own micro-batch keeps it."""
    row = BY_NAME[feature].overrides
    split = REFERENCE if strategy is None else SPLITS[strategy]
    if any(o.startswith("train.micro_batch_size=") for o in row):
        split = [o for o in split if not o.startswith("train.micro_batch_size=")]
    return [*BASE, *split, *row]


def table(rows: list[dict]) -> str:
    """The README's table from test_matrix's records: per cell the largest relative gap to one process
    (the tolerance in the last column), or `refused`."""
    cell = {(r["feature"], r["strategy"]): r for r in rows}
    lines = ["| feature | " + " | ".join(STRATEGIES) + " | tolerance |", "|---" * (len(STRATEGIES) + 2) + "|"]
    for feature in FEATURES:
        marks = []
        for strategy in STRATEGIES:
            r = cell.get((feature.name, strategy))
            marks.append("-" if r is None else "refused" if r["outcome"] == "refused" else f"{r['gap']:.1e}")
        lines.append(f"| {feature.name} | " + " | ".join(marks) + f" | {feature.tolerance:g} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python tests/matrix.py MATRIX_JSONL [...]: the README's table
    import json
    import sys

    print(table([json.loads(line) for path in sys.argv[1:] for line in open(path)]))
