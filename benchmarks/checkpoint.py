"""Checkpoint saves: how long the training loop stalls per save, sync against async.

    python -m benchmarks.checkpoint                        # 4 x 768 GPT, vocab 8192 (34.7M), CPU
    python -m benchmarks.checkpoint --n-layer 8 --saves 2  # 63M parameters, 757 MB checkpoints
    python -m benchmarks.checkpoint --device cuda          # the same on a GPU

One process (parallel=none) trains a GPT with the harness's own code, built as the loop
builds it (`build_strategy`, `build_model` on the meta device, `parallelize`) and stepped by
`trainer.step.train_step`, and saves the parts the loop saves (`Run.parts()`: the strategy's
model + optimizer and schedule, train state, spike baselines, RNG, sampler) with
`Checkpointer(CheckpointStore(run_dir, keep))`, with `async_save=False` (the default) and
`async_save=True` (torch.distributed.checkpoint's async_save), each mode into its own run
dir. It runs --saves rounds; in each, every mode takes --baseline-steps steps with nothing in flight, saves, and
takes --interval steps (checkpoint.interval) before the loop would save again; the modes
alternate order between rounds, so both see the same drift in the machine's load. For each
save it records, in the order the loop meets them:

  save()      the call itself. Sync: RNG + meta, the whole DCP write (fsynced), then the commit
              (sha256 of every file, each rank its share; manifest, fsync, rename, `latest`).
              Async: RNG + meta and DCP's staging copy of model + optimizer into CPU memory,
              then a background thread writes, checksums and commits.
  wait()      async only: at the next save (or the end of training), `Checkpointer.wait()`
              blocks until the background thread has committed the checkpoint (0 when it
              finished during the steps in between).
  extra       the steps that start while the background thread works run slower, competing
              with it: sum over them of (step time - median of the no-save steps just before
              this save). 0 for sync (nothing is in flight after save() returns); the step
              times of both modes are in the JSON.

stall per save = save() + wait() + extra: the training time a save costs. The write time is
from the start of save() until the checkpoint is committed; MB/s is checkpoint size over it. Sizes are the committed directory's files (model + AdamW state in fp32, RNG, meta,
manifest), MB = 10^6 bytes.

Step times on a shared CPU are noisy; the table gives the no-save step time's spread. The
figures go to --out (default benchmarks/results/checkpoint.json) as one JSON object.
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks import write_report
from benchmarks.harness import build_trainer

MB = 1e6


# -- pure helpers (tested in tests/test_benchmark_checkpoint.py) ----------------------------------


def overlap_extra(step_times: list[float], in_flight: list[bool], baseline: float) -> tuple[int, float]:
    """(number of steps that overlapped a write, their summed time above the baseline step)."""
    overlapped = [t for t, flying in zip(step_times, in_flight, strict=True) if flying]
    return len(overlapped), sum(t - baseline for t in overlapped)


def directory_bytes(directory: Path) -> int:
    """Total size of the files under directory."""
    return sum(p.stat().st_size for p in Path(directory).rglob("*") if p.is_file())


def summarize(mode: str, saves: list[dict[str, float]], baseline: list[float], size_bytes: int) -> dict[str, Any]:
    """Per-save means of one mode's records (keys of `saves`: save_s, wait_s, extra_s,
    overlapped, write_s)."""
    n = len(saves)

    def mean(key: str) -> float:
        return sum(s[key] for s in saves) / n

    stall = [s["save_s"] + s["wait_s"] + s["extra_s"] for s in saves]
    write_s = mean("write_s")
    return {
        "mode": mode,
        "saves": n,
        "checkpoint_mb": size_bytes / MB,
        "save_call_s": mean("save_s"),
        "wait_s": mean("wait_s"),
        "overlapped_steps": mean("overlapped"),
        "extra_step_s": mean("extra_s"),
        "stall_per_save_s": sum(stall) / n,
        "write_s": write_s,
        "write_mb_per_s": size_bytes / MB / write_s if write_s > 0 else float("nan"),
        "step_s": statistics.median(baseline),
        "step_s_min": min(baseline),
        "step_s_max": max(baseline),
    }


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The summary table: one row per mode."""
    header = (
        "| mode | saves | checkpoint MB | save() s | wait() s | overlapped steps "
        "| extra step time s | stall per save s | write s | write MB/s | step s, no save (min-max) |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['saves']} | {r['checkpoint_mb']:.1f} | {r['save_call_s']:.2f} | "
            f"{r['wait_s']:.2f} | {r['overlapped_steps']:.1f} | "
            f"{r['extra_step_s']:+.2f} | {r['stall_per_save_s']:.2f} | {r['write_s']:.2f} | "
            f"{r['write_mb_per_s']:.0f} | {r['step_s']:.3f} ({r['step_s_min']:.3f}-{r['step_s_max']:.3f}) |"
        )
    return "\n".join(lines)


# -- the measurement ------------------------------------------------------------------------------


class Harness:
    """The harness's strategy around a GPT, the run's other checkpointed parts, and one fixed
    random batch to step on."""

    def __init__(self, args: argparse.Namespace) -> None:
        from trainer.config import Config, ModelConfig, ParallelConfig, TrainConfig
        from trainer.data import Sampler
        from trainer.monitor import SpikeWatch
        from trainer.state import TrainState

        self.cfg = Config(
            model=ModelConfig(
                n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                vocab_size=args.vocab_size, block_size=args.seq_len,
            ),
            parallel=ParallelConfig(strategy="none"),
            train=TrainConfig(
                micro_batch_size=args.batch, seq_len=args.seq_len, device=args.device,
                max_steps=10_000,  # the LR schedule's length; never reached
            ),
        )  # fmt: skip
        self.strategy, self.n_params = build_trainer(self.cfg, seed=0)
        self.state = TrainState()
        self.spikes = SpikeWatch(self.cfg.monitor.spike.z, self.cfg.monitor.spike.warmup)
        self.sampler = Sampler(1000, 0)
        tokens = torch.randint(args.vocab_size, (args.batch, args.seq_len + 1))
        self.x = tokens[:, :-1].to(self.strategy.device)  # (B, T)
        self.y = tokens[:, 1:].to(self.strategy.device)  # (B, T)

    def step(self) -> float:
        """One optimizer step on the fixed batch (trainer.step.train_step); its wall time in seconds."""
        from trainer.step import train_step

        start = time.perf_counter()
        result = train_step(self.strategy, self.x, self.y, 1, self.cfg.optim.clip_grad_norm, spikes=self.spikes)
        if self.strategy.device.type == "cuda":
            torch.cuda.synchronize()  # the optimizer step's kernels, so the time is the step's
        self.state.record(self.x.numel(), result.target_tokens, result.stepped, result.non_finite)
        return time.perf_counter() - start

    def parts(self) -> dict[str, Any]:
        """What trainer.loop checkpoints (Run.parts): the model first, then the run's state."""
        from trainer.checkpoint import RNGState

        return {
            **self.strategy.checkpoint_parts(), "train_state": self.state, "spikes": self.spikes,
            "rng": RNGState(self.strategy.rank), "sampler": self.sampler,
        }  # fmt: skip


def one_save(trainer: Harness, checkpointer: Any, async_save: bool, args: argparse.Namespace) -> dict:
    """--baseline-steps steps with nothing in flight, a save, --interval steps, then what the
    loop's next save (or final wait) does first: Checkpointer.wait(). The record of that save."""
    baseline = [trainer.step() for _ in range(args.baseline_steps)]
    start = time.perf_counter()
    checkpointer.save(trainer.state.step, trainer.parts(), async_save=async_save)
    saved = time.perf_counter()
    done_at: list[float] = []
    pending = checkpointer.pending  # async: done once the background thread has committed
    if pending is not None:
        pending.add_done_callback(lambda _: done_at.append(time.perf_counter()))
    times, flying = [], []
    for _ in range(args.interval):
        flying.append(pending is not None and not pending.done())
        times.append(trainer.step())
    overlapped, extra = overlap_extra(times, flying, statistics.median(baseline))
    waited = time.perf_counter()
    checkpointer.wait()  # what the loop's next save (or the end of training) does first
    wait = time.perf_counter() - waited if pending is not None else 0.0
    # write time: sync, the save() call; async, until the background thread committed
    write = done_at[0] - start if done_at else saved - start
    return {
        "save_s": saved - start, "wait_s": wait, "overlapped": overlapped, "extra_s": extra,
        "write_s": write, "baseline_step_times": baseline, "step_times": times,
    }  # fmt: skip


def checkpoint_size(checkpointer: Any) -> int:
    """Bytes of the newest checkpoint, after checking it against its manifest."""
    from trainer.checkpoint import verify

    latest = checkpointer.store.find("auto")
    problem = verify(latest) if latest is not None else "no checkpoint found"
    if problem:
        raise RuntimeError(f"the last checkpoint does not verify: {problem}")
    return directory_bytes(latest)


def run(trainer: Harness, root: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """--saves rounds; each saves once in every mode (order alternating between rounds), so both
    modes see the same drift in the machine's load."""
    from trainer.checkpoint import Checkpointer, CheckpointStore

    checkpointers = {mode: Checkpointer(CheckpointStore(root / mode, keep=2)) for mode in args.modes}
    records: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    started = time.perf_counter()
    for round_index in range(args.saves):
        order = args.modes if round_index % 2 == 0 else args.modes[::-1]
        for mode in order:
            records[mode].append(one_save(trainer, checkpointers[mode], mode == "async", args))
        print(f"round {round_index + 1}/{args.saves} done at {time.perf_counter() - started:.0f} s")
    results = []
    for mode in args.modes:
        baseline = [t for r in records[mode] for t in r["baseline_step_times"]]
        size = checkpoint_size(checkpointers[mode])
        results.append({"summary": summarize(mode, records[mode], baseline, size), "saves": records[mode]})
    return results


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=12)
    parser.add_argument("--n-embd", type=int, default=768)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--saves", type=int, default=3, help="saves per mode")
    parser.add_argument("--interval", type=int, default=4, help="steps after each save (checkpoint.interval)")
    parser.add_argument(
        "--baseline-steps",
        type=int,
        default=3,
        help="steps with no save in flight, before each save",
    )
    parser.add_argument("--warmup-steps", type=int, default=1)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default)")
    parser.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    parser.add_argument("--dir", type=Path, default=None, help="where run dirs go (default: a temporary directory)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/checkpoint.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # DCP's writer thread warns that it assumes a single process, after the strategy's own
    # filter (a context manager on the training thread) has been lifted: we know.
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    trainer = Harness(args)
    for _ in range(args.warmup_steps):
        trainer.step()
    print(
        f"GPT {args.n_layer} x {args.n_embd}, vocab {args.vocab_size}: {trainer.n_params / 1e6:.1f}M params, "
        f"batch {args.batch} x {args.seq_len} tokens, device {trainer.strategy.device}, "
        f"{torch.get_num_threads()} threads; {args.saves} saves per mode, {args.interval} steps apart"
    )
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-checkpoint-"))
    for mode in args.modes:
        shutil.rmtree(root / mode, ignore_errors=True)
    try:
        results = run(trainer, root, args)
    finally:
        for mode in args.modes:  # a few GB each: not kept
            shutil.rmtree(root / mode, ignore_errors=True)
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    rows = [r["summary"] for r in results]
    print()
    print(markdown_table(rows))
    report = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "n_params": trainer.n_params,
        "device": str(trainer.strategy.device),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "elapsed_s": time.perf_counter() - started,
        "results": results,
    }
    write_report(args.out, report, f"({report['elapsed_s']:.0f} s)")


if __name__ == "__main__":
    main()
