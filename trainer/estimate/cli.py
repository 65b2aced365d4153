"""`python -m trainer.estimate [overrides]`: memory per rank for a config, predicted without building it.

The estimate (trainer.estimate.memory.estimate) printed as a markdown table, or with --json as JSON.
With --memory-budget 70GiB, also the activation-checkpointing plan (trainer.estimate.planner): the
setting that fits at the least recompute, as overrides to paste; exit status 1 when nothing fits.
With --gpus N, also the scale plan (trainer.estimate.scale): every strategy and (replicate, shard,
tensor) mesh on N GPUs, its memory, communication, step time, tokens/s per GPU and MFU, and the
fastest mesh that fits; exit status 1 when none fits.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from typing import Any

from trainer.estimate.memory import estimate
from trainer.estimate.mesh import GPUS, STRATEGIES, Mesh, hardware
from trainer.estimate.planner import parse_bytes, plan
from trainer.estimate.planner import table as plan_table
from trainer.estimate.scale import Options, plan_scale
from trainer.estimate.scale import table as scale_table

GIB = 2**30
EXPERT_PARTS = (  # the experts' share of the model states, as the table names them
    ("frozen", "weights_frozen"), ("trainable", "weights_trainable"), ("master", "master"), ("gradients", "gradients"),
    ("AdamW", "optimizer"),
)  # fmt: skip


def _gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def table(est: dict[str, Any]) -> str:
    """The estimate as two heading lines and a markdown table (GiB = 2^30 bytes)."""
    run, params, b, act, peak = est["run"], est["parameters"], est["bytes"], est["activations"], est["peak"]
    lora, host = run["lora"], set(est["host"])
    if lora:
        dora = " (DoRA)" if lora["dora"] else ""
        what = f"LoRA{dora} r={lora['r']} on {', '.join(lora['targets'])}, base in {lora['base']}"
    else:
        what = "full training"
    ckpt = run["activation_checkpointing"]
    if ckpt != "none":
        ckpt += f" ({act['checkpointed']} of {run['n_layer']} blocks)"
    loss = f"in chunks of {run['loss_chunk_size']} tokens" if run["loss_chunk_size"] else "over full logits"
    by_dtype = [(params["frozen_nf4"], "NF4"), *((n, dtype) for dtype, n in params["frozen_dtypes"].items())]
    frozen = ", ".join(f"{n:,} in {dtype}" for n, dtype in sorted(by_dtype, reverse=True) if n)
    rows = [
        ("weights, frozen", "weights_frozen", frozen),
        ("weights, trainable", "weights_trainable", f"{params['trainable']:,} parameters"),
        ("master weights", "master", "DeepSpeed's fp32 copy"),
        ("gradients", "gradients", "trainable parameters only, from backward to the step"),
        ("AdamW state", "optimizer", "exp_avg and exp_avg_sq in fp32"),
        ("gathered weights", "gathered", "one block and the root, whole, while they run"),
        ("buffers", "buffers", "DDP's gradient buckets / DeepSpeed's reduce bucket"),
    ]
    sizes = f"{params['total'] / 1e9:.3f}B parameters"
    if run["experts"]:
        x = run["experts"]
        sizes += (
            f" ({params['active'] / 1e9:.3f}B active: {x['per_token']} of {x['n_experts']} experts a token in "
            f"{x['sparse_layers']} sparse layers; the experts' tensors {params['experts'] / 1e9:.3f}B)"
        )
    lines = [
        f"{run['model']}: {sizes}, {params['trainable'] / 1e6:.2f}M trainable "
        f"({100 * params['trainable'] / params['total']:.2f}%): {what}",
        f"parallel={run['strategy']} on {run['world_size']} rank(s), precision={run['precision']}, micro-batch "
        f"{run['micro_batch_size']} x {run['seq_len']} tokens, checkpointing {ckpt}, loss {loss}; "
        f"{run['flops_per_token'] / 1e9:.1f} GFLOP a token (6 x active weights + attention)",
        "",
        "| per rank | GiB | |",
        "|---|---:|---|",
    ]
    for name, key, note in rows:
        if b[key] or key in ("weights_trainable", "gradients", "optimizer"):
            lines.append(f"| {name}{' (in host memory)' if key in host else ''} | {_gib(b[key])} | {note} |")
    experts = est["experts"]
    if experts:
        parts = ", ".join(f"{name} {_gib(experts[key])}" for name, key in EXPERT_PARTS if experts[key])
        ranks = run["experts"]["expert_parallel"]
        share = f"1/{ranks} of them on a rank; " if ranks > 1 else ""
        lines.append(f"| of which the experts' | {_gib(sum(experts.values()))} | {share}{parts or 'none'} |")
    per_block = f"a block keeps {_gib(act['block'])}"
    if act["checkpointed"]:
        per_block += f" ({_gib(act['block_checkpointed'])} checkpointed)"
    outside = _gib(act["front"] + act["back"])
    lines.append(f"| activations | {_gib(b['activations'])} | {per_block}; outside the blocks {outside} |")
    if act["held"]:
        note = "router logits" + (", checkpointed ones' top-k indices" if act["checkpointed"] else "")
        lines.append(f"| held by the sparse MLPs | {_gib(act['held'])} | {note} (not saved for backward) |")
    for moment, value in est["phases"].items():
        lines.append(f"| at the {moment.replace('_', ' ')} | {_gib(value)} | above the kept states |")
    lines.append(
        f"| **peak** | **{_gib(peak['bytes'])}** | at the {peak['at'].replace('_', ' ')}: kept states "
        f"{_gib(peak['kept_states'])} + {_gib(peak['bytes'] - peak['kept_states'])} |"
    )
    lines.append("")
    lines.append(
        "Allocated bytes (what torch.cuda.max_memory_allocated reports); the process also holds the CUDA "
        "context and kernels (about 0.5-1 GiB) and the caching allocator's free blocks."
    )
    lines += [f"Note: {note}" for note in est["notes"]]
    return "\n".join(lines)


def _scale_arguments(parser: argparse.ArgumentParser) -> None:
    """The scale planner's flags (trainer.estimate.scale)."""
    scale = parser.add_argument_group("scale plan (--gpus N)")
    scale.add_argument("--gpus", type=int, help="plan every strategy and mesh on N GPUs")
    scale.add_argument("--gpus-per-node", type=int, default=8, help="GPUs a node (tensor parallelism stays inside one)")
    scale.add_argument("--gpu", default="H100", choices=list(GPUS), help="datasheet peak, memory, HBM bandwidth")
    scale.add_argument("--gpu-memory", metavar="SIZE", help="memory a GPU (default: the GPU's, e.g. 80GiB)")
    scale.add_argument("--intra-bw", type=float, metavar="GB/s", help="a GPU's bandwidth each way inside a node (450)")
    scale.add_argument("--inter-bw", type=float, metavar="GB/s", help="a GPU's bandwidth each way between nodes (50)")
    scale.add_argument("--efficiency", type=float, help="achieved / datasheet FLOP/s (default: calibrated)")
    scale.add_argument("--tflops", type=float, help="achieved bf16 TFLOP/s a GPU, measured (sets --efficiency)")
    scale.add_argument("--float8", action="store_true", help="block linears in float8 (torchao, as torchtitan)")
    scale.add_argument("--async-tp", action="store_true", help="TP collectives overlapped with their matmuls")
    scale.add_argument(
        "--sac-op", action="store_true",
        help="torchtitan's per-op selective checkpointing (every second matmul recomputed) for all blocks",
    )  # fmt: skip
    scale.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    scale.add_argument("--mesh", metavar="R,S,T", help="only this mesh, under the config's parallel strategy")
    scale.add_argument("--rows", type=int, default=20, help="table rows, fastest first (0: all)")


def scale_plan(cfg, args: argparse.Namespace) -> dict[str, Any]:
    """The scale plan of the command's flags."""
    memory = parse_bytes(args.gpu_memory) if args.gpu_memory else None
    hw = hardware(
        args.gpu, cfg.train.compile, gpus_per_node=args.gpus_per_node, memory=memory,
        intra_bw=args.intra_bw and args.intra_bw * 1e9, inter_bw=args.inter_bw and args.inter_bw * 1e9,
        efficiency=args.efficiency,
    )  # fmt: skip
    if args.tflops:  # measured: the achieved rate replaces datasheet x efficiency
        hw = replace(hw, efficiency=args.tflops * 1e12 / hw.peak_flops)
    mesh = None
    if args.mesh:
        try:
            mesh = Mesh(cfg.parallel.strategy, *(int(d) for d in args.mesh.split(",")))
        except (TypeError, ValueError):
            raise ValueError(f"--mesh {args.mesh}: give R,S,T, e.g. --mesh 1,32,8") from None
    options = Options(args.float8, args.async_tp, "op" if args.sac_op else None)
    return plan_scale(cfg, args.gpus, hw, options, args.vocab, tuple(args.strategies), mesh)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m trainer.estimate`."""
    parser = argparse.ArgumentParser(prog="python -m trainer.estimate", description=__doc__.split("\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for python -m trainer")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: WORLD_SIZE, --gpus or 1)")
    parser.add_argument(
        "--vocab", type=int, default=None, help="the tokenizer's vocabulary when model.vocab_size is null"
    )
    parser.add_argument("--json", action="store_true", help="print the estimate as JSON")
    parser.add_argument(
        "--memory-budget", metavar="SIZE", help="plan activation checkpointing to fit SIZE per rank (70GiB, 80GB, ...)"
    )
    parser.add_argument(
        "--measure", action="store_true", help="with --memory-budget: time one block here and count its saved bytes"
    )
    _scale_arguments(parser)
    args = parser.parse_intermixed_args(argv)
    from trainer.__main__ import _one_line, compose_config

    world_size = args.world_size or int(os.environ.get("WORLD_SIZE", 0)) or args.gpus or 1
    try:
        budget = parse_bytes(args.memory_budget) if args.memory_budget is not None else None
        if args.measure and budget is None:
            raise ValueError("--measure measures the planner's inputs: give --memory-budget SIZE too")
        if args.gpus is not None and args.gpus < 1:
            raise ValueError(f"--gpus {args.gpus}: give a positive GPU count")
        cfg, _ = compose_config(args.overrides)
        est = estimate(cfg, world_size, args.vocab)
        if budget is not None:
            est["plan"] = plan(cfg, budget, world_size, args.vocab, args.measure, est)
        if args.gpus:
            est["scale"] = scale_plan(cfg, args)
    except Exception as error:  # Hydra, OmegaConf, ConfigError, a bad size or mesh: one line
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(est, indent=2))
    else:
        text = table(est) + (f"\n\n{plan_table(est['plan'])}" if budget is not None else "")
        print(text + (f"\n\n{scale_table(est['scale'], args.rows)}" if args.gpus else ""))
    unfit = (budget is not None and est["plan"]["chosen"] is None) or (args.gpus and est["scale"]["chosen"] is None)
    return 1 if unfit else 0
