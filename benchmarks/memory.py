"""Per-rank memory of model states under each strategy, next to the ZeRO paper's formulas.

    python -m benchmarks.memory                      # none / ddp / fsdp / zero1-3, 2 CPU ranks
    python -m benchmarks.memory --model gpt2 --strategies ddp zero3

For each strategy this launches itself under torchrun (2 ranks; `none` runs on 1). Each rank
builds the harness's strategy and model as the loop does (benchmarks/harness.py), runs one real
optimizer step (`trainer.step.train_step`: forward / backward, gradient statistics, clip, AdamW
step), and counts the bytes it holds, each tensor storage once (storages are deduplicated by
address, so views, tied weights and flat buffers count once, whole, padding included). The
gradients are counted where train_step's backward ends and before its optimizer step frees them
(a thin view of the strategy looks first when train_step asks it to unscale the gradients):

  params   the model's parameters as this rank holds them: whole tensors (none, ddp, zero1,
           zero2), this rank's DTensor shards plus any gathered copy still allocated (fsdp), or
           DeepSpeed's partitions `p.ds_tensor` plus the small parameters it keeps whole on
           every rank (zero3: below stage3_param_persistence_threshold). After the step.
  master   fp32 master copies DeepSpeed's optimizer keeps of its partition
           (`single_partition_of_fp32_groups`, zero1/2; `fp32_partitioned_groups_flat`, zero3).
  grads    gradient memory at the accumulation boundary, after backward and DeepSpeed's
           reduction, before the step (which frees it): `p.grad` (its local shard under fsdp);
           DeepSpeed's partition holders (`averaged_gradients` / `grads_in_partition` for
           zero1/2, `grad_partitions_flat_buffer` for zero3) and any `p.grad` left.
  optim    every tensor in the torch optimizer's `state` after the step (exp_avg, exp_avg_sq,
           step); under DeepSpeed the wrapped optimizer holds state for this rank's partition.
  buffers  communication buckets, not model states (the paper's "temporary buffers"): DDP's
           reducer buckets (its `bucket_sizes`; p.grad aliases them only with
           gradient_as_bucket_view=True, which the harness leaves off), DeepSpeed's reduce
           buckets (`ipg_buckets`, allocated at reduce_bucket_size elements). Not in total.
  grads pre-reduce  gradient bytes alive when autograd ends, before DeepSpeed's boundary
           reduction (zero1: the whole p.grad; zero2/3: p.grad views into the reduce bucket).
           DDP and FSDP reduce during backward, so for them it equals grads.

The paper (Rajbhandari et al. 2020, "ZeRO", sec. 5 / fig. 1) gives per-device model states for
Psi parameters, N ranks and K bytes of optimizer state per parameter: baseline (2+2+K)Psi,
P_os 4Psi + K Psi/N, P_os+g 2Psi + (2+K)Psi/N, P_os+g+p (4+K)Psi/N, with K=12 for mixed-
precision Adam. This run is fp32 throughout, so the same formulas with 4-byte parameters and
gradients and K=8 (exp_avg + exp_avg_sq) are the fair prediction; the table shows both.

DeepSpeed is optional (`pip install -e ".[deepspeed]"`): without it the default run measures
none / ddp / fsdp and says that it left zero1-3 out.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from benchmarks import write_report

MB = 1e6  # the table's MB are 10^6 bytes
REPO = Path(__file__).resolve().parent.parent
STRATEGIES = ("none", "ddp", "fsdp", "zero1", "zero2", "zero3")
# The ZeRO stage each strategy implements: DDP keeps everything whole (the paper's baseline);
# FSDP2 shards parameters, gradients and optimizer state (stage 3).
ZERO_STAGE = {"none": 0, "ddp": 0, "fsdp": 3, "zero1": 1, "zero2": 2, "zero3": 3}
MIXED = {"param_bytes": 2, "grad_bytes": 2, "optimizer_bytes": 12}  # the paper's fp16 + fp32 Adam
FP32 = {"param_bytes": 4, "grad_bytes": 4, "optimizer_bytes": 8}  # this run: fp32 Adam, no master
COLUMNS = ("params", "master", "grads", "optim")
# Model states (~4.3M parameters) dwarf every constant, yet each rank starts in seconds on a CPU.
DEFAULT_MODEL = dict(name="bench", vocab_size=4096, block_size=256, n_layer=4, n_head=4, n_embd=256)


# -- the ZeRO paper's per-device model states ---------------------------------------------------
def zero_model_states(
    psi: float,
    world_size: int,
    stage: int,
    param_bytes: int = 2,
    grad_bytes: int = 2,
    optimizer_bytes: int = 12,
) -> dict[str, float]:
    """Bytes of parameters, gradients and optimizer states per device at a ZeRO stage (0: baseline).

    Stage 1 partitions the optimizer states over world_size ranks, stage 2 also the gradients,
    stage 3 also the parameters. Defaults are the paper's mixed-precision Adam (2 + 2 + 12).
    """
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"ZeRO stage must be 0-3, got {stage}")
    n = world_size
    states = {
        "params": param_bytes * psi / (n if stage >= 3 else 1),
        "grads": grad_bytes * psi / (n if stage >= 2 else 1),
        "optim": optimizer_bytes * psi / (n if stage >= 1 else 1),
    }
    states["total"] = sum(states.values())
    return states


# -- counting bytes -----------------------------------------------------------------------------
def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def storage_bytes(tensors: Iterable[torch.Tensor | None], seen: set | None = None) -> int:
    """Bytes of the distinct storages behind these tensors (a DTensor counts its local shard).

    A storage counts once and whole: views, tied weights and slices of one flat buffer add
    nothing after the first, and a slice brings its whole buffer. Pass one `seen` set to
    several calls to attribute a storage to the first call that meets it. Freed storages
    (resized to 0 bytes) and meta tensors count 0.
    """
    seen = set() if seen is None else seen
    total = 0
    for tensor in tensors:
        if tensor is None:
            continue
        tensor = _local(tensor)
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        key = (tensor.device, storage.data_ptr())
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct tensors themselves (numel x element size), not their storages."""
    distinct = {}
    for tensor in tensors:
        tensor = _local(tensor) if tensor is not None else None
        if tensor is not None and tensor.numel() > 0:
            key = (tensor.device, tensor.data_ptr(), tensor.numel(), tensor.dtype)
            distinct[key] = tensor.numel() * tensor.element_size()
    return sum(distinct.values())


# -- what each strategy holds -------------------------------------------------------------------
def _flat(values: Iterable) -> list[torch.Tensor]:
    """Tensors inside nested lists / tuples / dicts (DeepSpeed keeps many of those)."""
    out = []
    for value in values:
        if isinstance(value, torch.Tensor):
            out.append(value)
        elif isinstance(value, dict):
            out += _flat(value.values())
        elif isinstance(value, (list, tuple)):
            out += _flat(value)
    return out


def param_tensors(strategy) -> list[torch.Tensor]:
    params = list(strategy.unwrapped().parameters())
    if strategy.name == "zero3":  # whole data of persistent (small) params, partitions of the rest
        return params + [getattr(p, "ds_tensor", None) for p in params]
    if strategy.name == "fsdp":  # local shards, plus any all-gathered copy not yet freed
        gathered = []
        for module in strategy.model.modules():
            group = module._get_fsdp_state()._fsdp_param_group if hasattr(module, "_get_fsdp_state") else None
            for fsdp_param in group.fsdp_params if group is not None else []:
                gathered += list(fsdp_param.all_gather_outputs)
                gathered.append(getattr(fsdp_param, "_unsharded_param", None))
        return params + gathered
    return params


def master_tensors(strategy) -> list[torch.Tensor]:
    if not strategy.name.startswith("zero"):
        return []
    optimizer = strategy.optimizer
    return _flat(
        [
            getattr(optimizer, "single_partition_of_fp32_groups", []),
            getattr(optimizer, "fp32_partitioned_groups_flat", []),
        ]
    )


def grad_tensors(strategy) -> list[torch.Tensor]:
    params = list(strategy.unwrapped().parameters())
    grads = [p.grad for p in params] + [getattr(p, "grad_accum", None) for p in params]
    if strategy.name.startswith("zero"):
        optimizer = strategy.optimizer
        grads += _flat(
            [
                getattr(optimizer, "averaged_gradients", {}),
                getattr(optimizer, "grads_in_partition", None),
                getattr(optimizer, "grad_partitions_flat_buffer", None),
                [t.grad for t in master_tensors(strategy)],
            ]
        )
    return grads


def optimizer_state_tensors(strategy) -> list[torch.Tensor]:
    # DeepSpeed's ZeRO optimizer wraps the torch AdamW the harness built as `.optimizer`.
    inner = strategy.optimizer.optimizer if strategy.name.startswith("zero") else strategy.optimizer
    return _flat([state for state in inner.state.values()])


def bucket_buffers(strategy) -> tuple[int, list[torch.Tensor]]:
    """(bytes held outside Python's reach, bucket tensors) of the strategy's gradient buckets."""
    if strategy.name == "ddp":
        sizes = strategy.model._get_ddp_logging_data().get("bucket_sizes", "")
        return sum(int(size) for size in str(sizes).split(",") if size.strip()), []
    if strategy.name.startswith("zero"):
        buckets = getattr(strategy.optimizer, "ipg_buckets", {}).values()
        return 0, _flat([bucket.buffer for bucket in buckets])
    return 0, []


# -- one rank's measurement ---------------------------------------------------------------------
class LooksAtGradients:
    """The strategy as train_step sees it, but `look()` runs first when train_step asks to unscale
    the gradients: right after forward / backward (and DeepSpeed's boundary reduction), before
    the gradient statistics and the optimizer step (which frees the gradients)."""

    def __init__(self, strategy: Any, look: Callable[[], None]) -> None:
        self.strategy, self.look = strategy, look

    def __getattr__(self, name: str) -> Any:
        return getattr(self.strategy, name)

    def unscale_gradients(self) -> None:
        self.look()
        self.strategy.unscale_gradients()


def measure(
    strategy_name: str,
    model_cfg,
    seq_len: int,
    micro_batch: int,
    deepspeed_config: str | None = None,
    device: str = "cpu",
) -> dict:
    """Build the strategy, run one optimizer step (train_step), and return this rank's bytes."""
    from benchmarks.harness import build_trainer
    from trainer.config import Config, OptimConfig, ParallelConfig, TrainConfig
    from trainer.step import train_step

    cfg = Config(
        model=model_cfg,
        parallel=ParallelConfig(strategy=strategy_name, deepspeed_config=deepspeed_config),
        optim=OptimConfig(),
        train=TrainConfig(micro_batch_size=micro_batch, seq_len=seq_len, max_steps=1, device=device),
    )
    strategy, psi = build_trainer(cfg, seed=0)

    pre_reduce: dict[str, int] = {}
    if strategy.name.startswith("zero"):
        # The engine calls allreduce_gradients once autograd is done, before its boundary
        # reduction: look at the gradients alive at that moment, then let it run.
        engine, reduce = strategy.model, strategy.model.allreduce_gradients

        def look_then_reduce(*args, **kwargs):
            _, buckets = bucket_buffers(strategy)
            pre_reduce["buffers"] = storage_bytes(buckets)
            params = strategy.unwrapped().parameters()
            pre_reduce["grads"] = tensor_bytes(t for p in params for t in (p.grad, getattr(p, "grad_accum", None)))
            return reduce(*args, **kwargs)

        engine.allreduce_gradients = look_then_reduce

    boundary: dict[str, int] = {}

    def look_at_boundary() -> None:
        # Buckets first, so a gradient that lives in a bucket counts as the bucket's.
        seen: set = set()
        hidden, buckets = bucket_buffers(strategy)
        boundary["buffers"] = max(hidden + storage_bytes(buckets, seen), pre_reduce.get("buffers", 0))
        boundary["grads"] = storage_bytes(grad_tensors(strategy), seen)

    generator = torch.Generator().manual_seed(strategy.rank)
    x = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len), generator=generator)
    y = torch.randint(0, model_cfg.vocab_size, (micro_batch, seq_len), generator=generator)
    train_step(
        LooksAtGradients(strategy, look_at_boundary), x.to(strategy.device), y.to(strategy.device),
        accum_steps=1, clip_grad_norm=cfg.optim.clip_grad_norm,
    )  # fmt: skip
    if "grads" not in boundary:
        raise RuntimeError("train_step never asked to unscale the gradients: nothing was measured")

    seen = set()  # after the step: what stays allocated from one step to the next
    row = {
        "strategy": strategy_name,
        "rank": strategy.rank,
        "world_size": strategy.world_size,
        "device": str(strategy.device),
        "param_count": psi,
        "params": storage_bytes(param_tensors(strategy), seen),
        "master": storage_bytes(master_tensors(strategy), seen),
        "grads": boundary["grads"],
        "optim": storage_bytes(optimizer_state_tensors(strategy), seen),
        "buffers": boundary["buffers"],
        "grads_pre_reduce": pre_reduce.get("grads", boundary["grads"]),
    }
    row["total"] = sum(row[c] for c in COLUMNS)
    strategy.barrier()
    strategy.close()
    return row


# -- the launcher -------------------------------------------------------------------------------
def build_model_config(args: argparse.Namespace):
    """The benchmark's model: a shipped configs/model/NAME.yaml, or the default shape, plus flags."""
    from omegaconf import OmegaConf

    from trainer.config import ModelConfig

    base = dict(DEFAULT_MODEL)
    if args.model:
        path = REPO / "configs" / "model" / f"{args.model}.yaml"
        if not path.is_file():
            shipped = sorted(p.stem for p in path.parent.glob("*.yaml"))
            raise SystemExit(f"--model {args.model}: no {path}; shipped models: {', '.join(shipped)}")
        base = OmegaConf.to_container(OmegaConf.load(path))
        # A null vocabulary means "the tokenizer's"; there is no tokenizer here, so pick one.
        base["vocab_size"] = base.get("vocab_size") or 4096
    for key in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
        if getattr(args, key) is not None:
            base[key] = getattr(args, key)
    return ModelConfig(**base)


def run_strategy(strategy: str, args: argparse.Namespace, model_json: str, rows_dir: Path) -> list[dict]:
    """Launch one strategy's ranks under torchrun; return their rows (rank order)."""
    nproc = 1 if strategy == "none" else args.world_size
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = torchrun + [f"--nproc_per_node={nproc}", "-m", "benchmarks.memory"]
    command += ["--worker", strategy]
    command += ["--model-json", model_json, "--rows", str(rows_dir), f"--device={args.device}"]
    command += [f"--seq-len={args.seq_len}", f"--micro-batch={args.micro_batch}"]
    if args.deepspeed_config and strategy.startswith("zero"):
        command += ["--deepspeed-config", args.deepspeed_config]
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        tail = f"{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
        raise SystemExit(f"{strategy}: torchrun exited {result.returncode}\n{tail}")
    return [json.loads((rows_dir / f"{strategy}.rank{rank}.json").read_text()) for rank in range(nproc)]


def deepspeed_version() -> str | None:
    """DeepSpeed's installed version; None when it is not installed (it is an optional extra)."""
    if importlib.util.find_spec("deepspeed") is None:  # as config.check_run tests it
        return None
    try:
        return version("deepspeed")
    except PackageNotFoundError:  # importable, but not an installed distribution
        return "unknown"


def choose_strategies(requested: list[str] | None, deepspeed: str | None) -> list[str]:
    """The strategies to measure: those asked for, or by default every one this install can run
    (zero1-3 need DeepSpeed). Asking for zero1-3 without DeepSpeed stops with the fix."""
    if requested is None:
        return [s for s in STRATEGIES if deepspeed is not None or not s.startswith("zero")]
    missing = [s for s in requested if s.startswith("zero")] if deepspeed is None else []
    if missing:
        raise SystemExit(
            f"--strategies {' '.join(missing)} needs DeepSpeed, which is not installed: "
            'pip install -e ".[deepspeed]", or leave zero1-3 out'
        )
    return requested


def predictions(strategy: str, psi: int, world_size: int) -> dict[str, float]:
    stage = ZERO_STAGE[strategy]
    return {
        "paper_mixed": zero_model_states(psi, world_size, stage, **MIXED)["total"],
        "paper_fp32": zero_model_states(psi, world_size, stage, **FP32)["total"],
    }


def markdown_table(results: list[dict]) -> str:
    """One row per strategy (rank 0's numbers), in MB (10^6 bytes)."""
    header = [
        "strategy",
        "ranks",
        *(f"{column} MB" for column in (*COLUMNS, "total", "buffers")),
        "grads pre-reduce MB",
        "paper 2+2+12 MB",
        "paper fp32 4+4+8 MB",
        "total / fp32",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for result in results:
        row = result["ranks"][0]
        cells = [result["strategy"], str(row["world_size"])]
        cells += [f"{row[key] / MB:.2f}" for key in (*COLUMNS, "total", "buffers", "grads_pre_reduce")]
        cells += [f"{result['paper_mixed'] / MB:.2f}", f"{result['paper_fp32'] / MB:.2f}"]
        cells.append(f"{row['total'] / result['paper_fp32']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rank_spread(rows: list[dict]) -> float:
    """Largest relative difference between ranks over the columns and the total."""
    spread = 0.0
    for key in (*COLUMNS, "total", "buffers"):
        values = [row[key] for row in rows]
        if max(values) > 0:
            spread = max(spread, (max(values) - min(values)) / max(values))
    return spread


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a configs/model/NAME.yaml (tiny, gpt2, ...); default: 4 x 256, vocab 4096")
    parser.add_argument("--n-layer", dest="n_layer", type=int)
    parser.add_argument("--n-head", dest="n_head", type=int)
    parser.add_argument("--n-embd", dest="n_embd", type=int)
    parser.add_argument("--vocab-size", dest="vocab_size", type=int)
    parser.add_argument("--block-size", dest="block_size", type=int)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--world-size", type=int, default=2, help="ranks for every strategy but none")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu")
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=STRATEGIES,
        help="default: all six (without DeepSpeed installed: none, ddp, fsdp)",
    )
    parser.add_argument("--deepspeed-config", help="a DeepSpeed JSON of your own for zero1-3")
    parser.add_argument(
        "--reduce-bucket-size",
        type=int,
        help="DeepSpeed reduce_bucket_size in elements (default 5e8)",
    )
    parser.add_argument("--out", default="benchmarks/results/memory.json")
    parser.add_argument("--worker", choices=STRATEGIES, help=argparse.SUPPRESS)
    parser.add_argument("--model-json", help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    from trainer.config import ModelConfig

    model_cfg = ModelConfig(**json.loads(args.model_json))
    row = measure(args.worker, model_cfg, args.seq_len, args.micro_batch, args.deepspeed_config, args.device)
    (Path(args.rows) / f"{args.worker}.rank{row['rank']}.json").write_text(json.dumps(row))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.deepspeed_config and args.reduce_bucket_size:
        raise SystemExit(
            "--reduce-bucket-size writes its own DeepSpeed JSON: put the key in --deepspeed-config instead"
        )
    if args.deepspeed_config:
        args.deepspeed_config = str(Path(args.deepspeed_config).resolve())
    deepspeed = deepspeed_version()
    strategies = choose_strategies(args.strategies, deepspeed)
    if deepspeed is None and args.strategies is None:
        print(
            'DeepSpeed is not installed: zero1-3 left out (pip install -e ".[deepspeed]")',
            flush=True,
        )
    model_cfg = build_model_config(args)
    model_json = json.dumps(dataclasses.asdict(model_cfg))
    results = []
    with tempfile.TemporaryDirectory() as rows_dir:
        if args.reduce_bucket_size:
            ds_json = {"zero_optimization": {"reduce_bucket_size": args.reduce_bucket_size}}
            args.deepspeed_config = str(Path(rows_dir) / "deepspeed.json")
            Path(args.deepspeed_config).write_text(json.dumps(ds_json))
        for strategy in strategies:
            start = time.perf_counter()
            rows = run_strategy(strategy, args, model_json, Path(rows_dir))
            spread = rank_spread(rows)
            psi = rows[0]["param_count"]
            results.append(
                {
                    "strategy": strategy,
                    "zero_stage": ZERO_STAGE[strategy],
                    "ranks": rows,
                    "rank_spread": spread,
                    **predictions(strategy, psi, rows[0]["world_size"]),
                }
            )
            note = "" if spread <= 0.03 else f"  (ranks differ by {spread:.1%})"
            print(
                f"{strategy}: {len(rows)} rank(s), {time.perf_counter() - start:.0f} s{note}",
                flush=True,
            )

    psi = results[0]["ranks"][0]["param_count"]
    shape = " ".join(f"{key}={getattr(model_cfg, key)}" for key in ("n_layer", "n_embd", "vocab_size", "block_size"))
    print(
        f"\nPsi = {psi:,} parameters ({shape}); fp32 params, grads and AdamW state; "
        f"{args.world_size} ranks on {results[-1]['ranks'][0]['device']}; "
        f"micro batch {args.micro_batch} x {args.seq_len} tokens"
    )
    print(f"per-rank bytes on rank 0, MB = 10^6 bytes; 4 x Psi = {4 * psi / MB:.2f} MB\n")
    print(markdown_table(results))

    settings = {
        "model": dataclasses.asdict(model_cfg),
        "world_size": args.world_size,
        "device": args.device,
        "seq_len": args.seq_len,
        "micro_batch": args.micro_batch,
        "reduce_bucket_size": args.reduce_bucket_size,
        "deepspeed_config": None if args.reduce_bucket_size else args.deepspeed_config,
        "torch": torch.__version__,
        "deepspeed": deepspeed,
        "bytes_per_MB": MB,
    }
    write_report(args.out, {"settings": settings, "param_count": psi, "rows": results})


if __name__ == "__main__":
    main()
