"""The scale planner (trainer.estimate.scale) against torchtitan's published H100 throughput.

    python -m benchmarks.planner_check                # table + benchmarks/results/planner_check.json
    python -m benchmarks.planner_check --out /tmp/planner_check.json

torchtitan's benchmarks/llama3_h100_202412_torchtitan.md (torch and torchtitan of 2024-12-26):
Llama 3.1 8B / 70B / 405B on H100s (96 GB HBM2e, 500 W) in nodes of 8 with NVLink, 400 Gb/s RDMA a
GPU between nodes, sequences of 8192 tokens, tokens/s per GPU read at step 90, memory as
torch.cuda.max_memory_reserved. Each row's setup is the planner's input: the model's shape, the
local batch (sequences a data-parallel rank), the mesh (FSDP x TP), the checkpointing (torchtitan's
per-op selective, or full), torch.compile, float8 linears, async TP.

The planner's three achieved-efficiency factors (trainer.estimate.mesh.EFFICIENCY) come from the
three 8B rows on 8 GPUs (eager, compiled, compiled + float8): the script solves for the factor that
makes each of those rows exact and prints it next to the shipped one; every other row is a
prediction with the shipped factors. The 405B rows ran pipeline parallelism (PP 8), which the planner
does not model: they get no prediction; the planner's own plan for that model, those GPUs and that
global batch (without PP) is printed below the table, not compared.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks import write_report
from trainer.__main__ import compose_config
from trainer.estimate.mesh import EFFICIENCY, GIB, Hardware, Mesh, hardware
from trainer.estimate.scale import Options, plan_scale

REPO = Path(__file__).resolve().parent.parent
SOURCE = "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md"
SHAPES = {  # Llama 3.1's published shapes, on configs/model/llama3-8b.yaml (vocabulary 128256, GQA 8 kv heads)
    "8B": [],
    "70B": ["model.n_layer=80", "model.n_embd=8192", "model.n_head=64", "model.intermediate_size=28672"],
    "405B": ["model.n_layer=126", "model.n_embd=16384", "model.n_head=128", "model.intermediate_size=53248"],
}
GPU = dict(memory=94 * GIB, hbm=2.4e12)  # their H100s: 96 GB HBM2e (about 94 GiB usable), 2.4 TB/s


@dataclass(frozen=True)
class Row:
    """One published row and the setup that reproduces it."""

    name: str
    table: str
    model: str
    gpus: int
    mesh: Mesh
    local_batch: int
    checkpointing: str  # op (torchtitan's per-op selective) | full
    compile: bool = False
    float8: bool = False
    async_tp: bool = False
    seq_len: int = 8192
    tokens_per_s: float = 0.0  # torchtitan's TPS/GPU
    memory_gib: float = 0.0  # torchtitan's memory (reserved)
    calibrates: str | None = None  # the EFFICIENCY key this row sets
    pipeline: str | None = None  # a PP row: not predicted, the reason


FSDP8, FSDP128 = Mesh("fsdp", 1, 8, 1), Mesh("fsdp", 1, 128, 1)
ROWS = [
    Row("8B FSDP", "1", "8B", 8, FSDP8, 2, "op", tokens_per_s=5762, memory_gib=82.4, calibrates="eager"),
    Row("8B FSDP + compile", "1", "8B", 8, FSDP8, 2, "op", True, tokens_per_s=6667, memory_gib=77.0,
        calibrates="compiled"),
    Row("8B FSDP + compile + float8", "1", "8B", 8, FSDP8, 2, "op", True, True, tokens_per_s=8532, memory_gib=76.8,
        calibrates="float8"),
    Row("8B FSDP, seq 32768 (CP 1), full AC + compile + float8", "2", "8B", 8, FSDP8, 1, "full", True, True,
        seq_len=32768, tokens_per_s=3890, memory_gib=83.9),
    Row("8B FSDP", "3", "8B", 128, FSDP128, 2, "op", tokens_per_s=5605, memory_gib=67.0),
    Row("8B FSDP + compile", "3", "8B", 128, FSDP128, 2, "op", True, tokens_per_s=6514, memory_gib=62.0),
    Row("8B FSDP + compile + float8", "3", "8B", 128, FSDP128, 2, "op", True, True, tokens_per_s=8380,
        memory_gib=61.8),
    Row("70B FSDP 32 x TP 8 + compile + float8", "4", "70B", 256, Mesh("fsdp", 1, 32, 8), 16, "full", True, True,
        tokens_per_s=829, memory_gib=71.9),
    Row("70B FSDP 32 x TP 8 + compile + float8 + async TP", "4", "70B", 256, Mesh("fsdp", 1, 32, 8), 16, "full",
        True, True, True, tokens_per_s=876, memory_gib=67.6),
    Row("405B FSDP 8 x TP 8 x PP 8, 1F1B", "5", "405B", 512, Mesh("fsdp", 1, 8, 8), 32, "full", True, True, True,
        tokens_per_s=100, memory_gib=82.5, pipeline="pipeline parallelism (PP 8, 1F1B): not in the planner"),
    Row("405B FSDP 8 x TP 8 x PP 8, interleaved 1F1B", "5", "405B", 512, Mesh("fsdp", 1, 8, 8), 32, "full", True,
        True, True, tokens_per_s=128, memory_gib=72.7,
        pipeline="pipeline parallelism (PP 8, interleaved 1F1B): not in the planner"),
]  # fmt: skip


def config(row: Row, global_batch: int | None = None):
    """The harness config of a row: the shape, FSDP in bf16 (fp32 master weights and reduction, as
    torchtitan's mixed precision), full logits (torchtitan of 2024 did not chunk the loss)."""
    overrides = [
        "model=llama3-8b", *SHAPES[row.model], f"model.name=llama3.1-{row.model.lower()}", "parallel=fsdp",
        "precision=bf16", "model.loss_chunk_size=0", f"model.block_size={row.seq_len}",
        f"train.seq_len={row.seq_len}", f"train.micro_batch_size={row.local_batch}", f"train.compile={row.compile}",
        f"model.activation_checkpointing={'full' if row.checkpointing == 'full' else 'none'}",
    ]  # fmt: skip
    overrides += [f"train.global_batch_size={global_batch}"] if global_batch else []
    return compose_config(overrides)[0]


def predict(row: Row, hw: Hardware, mesh: Mesh | None = None, global_batch: int | None = None) -> dict[str, Any]:
    """The planner on a row's setup: its mesh (or every mesh when `mesh` is None and the row's is
    not asked for)."""
    options = Options(float8=row.float8, async_tp=row.async_tp, sac="op" if row.checkpointing == "op" else None)
    return plan_scale(config(row, global_batch), row.gpus, hw, options, mesh=mesh)


def row_hardware(row: Row, **efficiency: float) -> Hardware:
    return hardware("H100", compiled=row.compile, **GPU, **efficiency)


def calibrate(row: Row) -> float:
    """The efficiency (row.calibrates' field) that makes the row's prediction exact: bisection."""
    field = "fp8_efficiency" if row.calibrates == "float8" else "efficiency"
    fixed = {"efficiency": EFFICIENCY["compiled"]} if row.calibrates == "float8" else {}
    low, high = 0.05, 1.0
    for _ in range(24):  # to 6e-8
        mid = (low + high) / 2
        tps = predict(row, row_hardware(row, **fixed, **{field: mid}), row.mesh)["rows"][0]["tokens_per_s"]
        low, high = (mid, high) if tps < row.tokens_per_s else (low, mid)
    return (low + high) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "planner_check.json"))
    args = parser.parse_args()
    calibrated = {row.calibrates: calibrate(row) for row in ROWS if row.calibrates}
    results, lines = [], []
    lines += [
        f"torchtitan's H100 rows ({SOURCE}) against the planner (python -m trainer.estimate --gpus N)",
        "",
        "| setup | table | GPUs | mesh R x S x T | local batch | AC | torchtitan tokens/s/GPU | predicted | error | "
        "torchtitan memory GiB (reserved) | predicted peak GiB (allocated) |",
        "|---|---|---:|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for row in ROWS:
        record: dict[str, Any] = {**row.__dict__, "mesh": row.mesh.label}
        if row.pipeline:
            record |= {"predicted": None, "error": None, "why": row.pipeline}
            lines.append(
                f"| {row.name} | {row.table} | {row.gpus} | {row.mesh.label} x PP 8 | {row.local_batch} | "
                f"{row.checkpointing} | {row.tokens_per_s:,.0f} | - | - | {row.memory_gib} | - |"
            )
            results.append(record)
            continue
        plan = predict(row, row_hardware(row), row.mesh)["rows"][0]
        error = plan["tokens_per_s"] / row.tokens_per_s - 1
        record |= {
            "predicted": plan["tokens_per_s"], "error": error, "predicted_peak_gib": plan["peak"] / GIB,
            "mfu": plan["mfu"], "step_s": plan["step_s"], "compute_s": plan["compute_s"],
            "tp_exposed_s": plan["tp_exposed_s"], "data_exposed_s": plan["data_exposed_s"], "comm": plan["comm"],
        }  # fmt: skip
        results.append(record)
        note = f" (calibrates {row.calibrates})" if row.calibrates else ""
        lines.append(
            f"| {row.name}{note} | {row.table} | {row.gpus} | {row.mesh.label} | {row.local_batch} | "
            f"{row.checkpointing} | {row.tokens_per_s:,.0f} | {plan['tokens_per_s']:,.0f} | {100 * error:+.1f}% | "
            f"{row.memory_gib} | {plan['peak'] / GIB:.1f} |"
        )
    lines.append("")
    lines.append(
        "efficiency factors: shipped "
        + ", ".join(f"{k} {v:.3f}" for k, v in EFFICIENCY.items())
        + "; these rows solve to "
        + ", ".join(f"{k} {v:.3f}" for k, v in calibrated.items())
    )
    big = next(row for row in ROWS if row.pipeline)
    # local batch 1, accumulated to the global batch 256 (32 x 8 data-parallel ranks)
    own = predict(replace(big, pipeline=None, local_batch=1), row_hardware(big), global_batch=256)
    best = own["chosen"] or own["least_peak"]
    lines.append(
        f"405B on 512 GPUs at torchtitan's global batch 256, without PP (not comparable: a different "
        f"parallelism): the planner's plan is {best['overrides']} (mesh {best['label']}, {best['accumulation']} "
        f"micro-batches of 1 a step), {best['tokens_per_s']:,.0f} tokens/s a GPU, "
        f"peak {best['peak'] / GIB:.1f} GiB ({'fits' if best['fits'] else 'does not fit'})"
    )
    print("\n".join(lines))
    predicted = [r for r in results if r["predicted"] is not None and not r["calibrates"]]
    worst = max(abs(r["error"]) for r in predicted)
    print(f"\nlargest error of the {len(predicted)} predicted rows: {100 * worst:.1f}%")
    write_report(
        args.out,
        {"source": SOURCE, "efficiency": EFFICIENCY, "calibrated": calibrated, "rows": results,
         "405b_without_pp": {k: best[k] for k in ("overrides", "label", "tokens_per_s", "peak", "fits", "mfu")}},
    )  # fmt: skip


if __name__ == "__main__":
    main()
